"""Flora with transformers.Trainer: the optimizer via optimizers=(...), accumulation via FloraTrainer."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flora_opt  # noqa: E402
from flora_opt.hf import FloraTrainer  # noqa: E402

GAS = 4
CONFIG = dict(
    n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        ids = torch.randint(0, 96, (16,), generator=generator)
        return {"input_ids": ids, "labels": ids}


class SubstepCheck(transformers.TrainerCallback):
    """After every non-sync micro-batch, the compressed tensors must hold no gradient."""

    def __init__(self):
        self.trainer = None
        self.checked = 0

    def on_substep_end(self, args, state, control, **kwargs):
        accumulator = self.trainer.accelerator.accumulator
        for param in accumulator.compressed_parameters():
            assert param.grad is None
        assert accumulator.buffer_bytes() > 0
        self.checked += 1


def train(
    tmp_path, trainer_cls=transformers.Trainer, max_steps=3, resume=None, save_steps=None, callback=None, **flora
):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    optimizer = flora_opt.Flora(model.parameters(), lr=1e-2, rank=4)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=GAS,
        max_steps=max_steps,
        max_grad_norm=1.0,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    kwargs = dict(model=model, args=args, train_dataset=Tokens(), optimizers=(optimizer, scheduler))
    trainer = trainer_cls(**kwargs, **flora)
    if callback is not None:
        callback.trainer = trainer
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def test_flora_trainer_without_rank_is_the_trainer(tmp_path):
    _, expected = train(tmp_path / "a")
    trainer, model = train(tmp_path / "b", FloraTrainer)
    assert type(trainer.accelerator).__name__ == "FloraAccelerator" and trainer.accelerator.accumulator is None
    for p, q in zip(expected.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_flora_trainer_compresses_accumulation_and_layerwise_matches(tmp_path):
    check = SubstepCheck()
    trainer, compressed = train(tmp_path / "a", FloraTrainer, callback=check, accumulation_compression_rank=4)
    assert check.checked == 3 * (GAS - 1)
    assert trainer.accelerator.accumulator.cycle == trainer.state.global_step == 3
    norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    trainer, layerwise = train(tmp_path / "b", FloraTrainer, accumulation_compression_rank=4, layerwise=True)
    assert trainer.accelerator.accumulator.max_grad_norm == 1.0  # TrainingArguments.max_grad_norm
    layerwise_norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert layerwise_norms == pytest.approx(norms, rel=1e-5)  # exact pre-clip global norms
    for p, q in zip(compressed.parameters(), layerwise.parameters()):
        # per-tensor clipping differs from global clipping; Flora's normalised update barely notices
        torch.testing.assert_close(q, p, rtol=0, atol=1e-4)


def test_flora_trainer_resume_continues_the_cycles(tmp_path):
    _, expected = train(tmp_path / "a", FloraTrainer, max_steps=4, accumulation_compression_rank=4)
    train(tmp_path / "b", FloraTrainer, max_steps=4, save_steps=2, accumulation_compression_rank=4)
    trainer, resumed = train(
        tmp_path / "c",
        FloraTrainer,
        max_steps=4,
        resume=str(tmp_path / "b" / "checkpoint-2"),
        accumulation_compression_rank=4,
    )
    assert trainer.accelerator.accumulator.cycle == 4
    for p, q in zip(expected.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


class ShortTokens(Tokens):
    def __len__(self):
        return 18  # 9 micro-batches of 2: two cycles of GAS=4, then a cycle of one micro-batch


@pytest.mark.parametrize("flora", [dict(layerwise=True), dict(accumulation_compression_rank=4)])
def test_flora_trainer_epoch_ending_with_a_one_micro_batch_cycle(tmp_path, flora):
    """The loop checks of FloraAccelerator.backward accept the Trainer's own cycle bookkeeping,
    including the short last cycle of an epoch."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    optimizer = flora_opt.Flora(model.parameters(), lr=1e-2, rank=4)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=GAS,
        num_train_epochs=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    trainer = FloraTrainer(model=model, args=args, train_dataset=ShortTokens(), optimizers=(optimizer, None), **flora)
    trainer.train()
    assert trainer.state.global_step == 6
    assert trainer.accelerator.accumulator.cycle == 6


def test_flora_trainer_never_swaps_the_trainer_module_accelerator(tmp_path, monkeypatch):
    """The FloraAccelerator is handed to this Trainer's creation only: transformers.trainer's
    module-global ``Accelerator`` stays the accelerate class, also while the FloraTrainer builds
    its accelerator (a process-wide swap would leak into other Trainers and threads)."""
    import accelerate
    import transformers.trainer as trainer_module

    import flora_opt.hf as hf

    seen = []

    class Recording(hf.FloraAccelerator):
        def __init__(self, *args, **kwargs):
            seen.append(trainer_module.Accelerator)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(hf, "FloraAccelerator", Recording)
    trainer, _ = train(tmp_path, FloraTrainer, max_steps=1, accumulation_compression_rank=4)
    assert type(trainer.accelerator) is Recording
    assert seen == [accelerate.Accelerator]
    assert trainer_module.Accelerator is accelerate.Accelerator
    plain = transformers.Trainer(
        model=transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG)), args=trainer.args
    )
    assert type(plain.accelerator) is accelerate.Accelerator
