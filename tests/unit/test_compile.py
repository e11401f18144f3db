"""train.compile on CPU: when compiling is refused, what a failing compile falls back to, and the LoRA input
casts that autocast makes redundant. (The compiled and CUDA-graph paths themselves run in tests/gpu.)"""

from __future__ import annotations

import pytest
import torch

from runner.events import EventBus, Warning
from runner.fit import StepOutOfMemory
from runner.profile import LoraConfig, load_profile
from runner.train import compiling, lora, prepare
from runner.train.cache import build_cache, open_cache
from runner.train.compiling import compile_available  # the real one: _pretend_compile replaces the module's
from runner.train.loop import Trainer
from runner.train.lora import lora_state_dict
from runner.train.testmodels import build_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    build_cache(load_profile("tiny"), folder, parts=build_tiny(0))
    return open_cache(folder)


def _trainer(cached, compile_mode="off", bus=None):
    return Trainer(
        load_profile("tiny", [f'train.compile="{compile_mode}"']), cached, build_tiny(0).unet,
        micro_batch=2, grad_accum=2, gradient_checkpointing=False, device="cpu", bus=bus,
    )  # fmt: skip


def _warnings(bus):
    seen = []
    bus.subscribe(lambda e: seen.append(e) if isinstance(e, Warning) else None)
    return seen


def test_cpu_stays_eager_and_says_so_only_when_compile_was_asked_for(cached):
    bus = EventBus()
    seen = _warnings(bus)
    assert _trainer(cached, "auto", bus).compiled is None
    assert seen == []
    assert _trainer(cached, "graphs", bus).compiled is None
    assert [w.kind for w in seen] == ["compile"] and "CUDA only" in seen[0].message


def test_graphs_need_dropout_off_and_full_precision_text_encoders_and_only_a_named_mode_warns(monkeypatch):
    """What train.compile runs where torch.compile works: auto means graphs, and falls to blocks silently
    where graphs cannot run; graphs asked for by name falls to blocks with a warning saying why."""
    monkeypatch.setattr(compiling, "compile_available", lambda device, state=None: (True, ""))
    cuda, plain = torch.device("cuda"), LoraConfig()
    dropout, eightbit = LoraConfig(dropout=0.1), LoraConfig(text_encoder=True, text_encoder_8bit=True)
    assert compiling.compile_mode("auto", plain, cuda) == ("graphs", "")
    assert compiling.compile_mode("off", plain, cuda) == (None, "")
    assert compiling.compile_mode("blocks", dropout, cuda) == ("blocks", "")
    assert compiling.compile_mode("auto", dropout, cuda) == ("blocks", "")
    assert compiling.compile_mode("auto", eightbit, cuda) == ("blocks", "")
    mode, why = compiling.compile_mode("graphs", dropout, cuda)
    assert mode == "blocks" and "lora.dropout = 0" in why
    mode, why = compiling.compile_mode("graphs", eightbit, cuda)
    assert mode == "blocks" and "8-bit text encoders" in why


class _BrokenCompile:
    """Stands in for a compiled block whose compiler fails on first use (no C compiler, old GPU...)."""

    def __init__(self, error):
        self.error, self.calls = error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise self.error


def _pretend_compile(monkeypatch, error):
    broken = _BrokenCompile(error)

    def compile_blocks(unet):
        for module in unet.modules():
            if type(module).__name__ in compiling.COMPILED_BLOCKS:
                module._compiled_call_impl = broken
        return 1

    monkeypatch.setattr(compiling, "compile_available", lambda device, state=None: (True, ""))
    monkeypatch.setattr(prepare, "compile_blocks", compile_blocks)
    return broken


def test_a_failing_compile_falls_back_to_eager_and_trains_the_same_weights(cached, monkeypatch):
    reference = _trainer(cached)
    expected = [reference.step(s).loss for s in range(3)]
    broken = _pretend_compile(monkeypatch, RuntimeError("InductorError: no working C compiler"))
    bus = EventBus()
    seen = _warnings(bus)
    trainer = _trainer(cached, "blocks", bus)
    assert trainer.compiled == "blocks"
    got = [trainer.step(s).loss for s in range(3)]
    assert broken.calls == 1 and trainer.compiled is None
    assert [w.kind for w in seen] == ["compile"] and "no working C compiler" in seen[0].message
    assert got == expected
    a, b = lora_state_dict(reference.unet), lora_state_dict(trainer.unet)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a later trainer sharing the state (the fit's next probe, the run's trainer) is told at once:
    assert "no working C compiler" in compile_available(torch.device("cuda"), trainer.compile_state)[1]


def test_out_of_memory_in_a_compiled_step_is_not_taken_for_a_compile_failure(cached, monkeypatch):
    _pretend_compile(monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))
    trainer = _trainer(cached, "blocks")
    with pytest.raises(StepOutOfMemory, match="CUDA out of memory"):  # the step's OOM, for the back-off
        trainer.step(0)
    assert trainer.compiled == "blocks"  # the fit backs off to a smaller plan, still compiled


def test_lora_input_casts_are_restored_after_eager_sections():
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = build_tiny(0).unet
    lora.attach_lora(unet, LoraConfig(rank=4, alpha=4))
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    lora.set_lora_input_casts(unet, enabled=False)
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    with compiling.eager(unet):
        assert all(m.cast_input_dtype_enabled for m in layers)
    assert not any(m.cast_input_dtype_enabled for m in layers)


@pytest.mark.slow  # inductor compiles the tiny UNet's blocks in about two minutes on 2 cores
def test_compiled_blocks_match_eager_on_cpu():
    torch.manual_seed(0)
    unet = build_tiny(0).unet
    lora.attach_lora(unet, LoraConfig(rank=4, alpha=4))
    unet.enable_gradient_checkpointing()
    x, t, enc = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 64)
    cond = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}

    def run():
        for p in lora.lora_parameters(unet):
            p.grad = None
        out = unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=cond).sample
        out.pow(2).mean().backward()
        return out.detach(), [p.grad.clone() for p in lora.lora_parameters(unet)]

    keys = set(unet.state_dict())
    eager_out, eager_grads = run()
    assert compiling.compile_blocks(unet) > 0 and compiling.compile_blocks(unet) == 0
    out, grads = run()
    assert set(unet.state_dict()) == keys  # checkpoints and exports see the same names
    assert torch.allclose(out, eager_out, atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-3) for a, b in zip(grads, eager_grads, strict=True))


# --- the compile cache carried between sessions ------------------------------------------------


def _store(tmp_path, workdir="work"):
    from runner.checkpoint.store import FolderStore
    from runner.storage.local import LocalStorage

    return FolderStore(LocalStorage(tmp_path / "storage"), "run", tmp_path / workdir)


def test_a_stored_compile_cache_comes_back_verified_in_another_session(tmp_path):
    from runner.checkpoint.store import fetch_compile_cache, store_compile_cache

    first, bus = _store(tmp_path), EventBus()
    assert fetch_compile_cache(first, "torch-x-gpu-y", bus) is None  # nothing stored yet
    store_compile_cache(first, "torch-x-gpu-y", b"kernels" * 1000)
    store_compile_cache(first, "torch-x-gpu-y", b"other")  # the first one stays
    second, bus2 = _store(tmp_path, workdir="elsewhere"), EventBus()
    seen = _warnings(bus2)
    assert fetch_compile_cache(second, "torch-x-gpu-y", bus2) == b"kernels" * 1000
    assert fetch_compile_cache(second, "torch-other", bus2) is None
    assert seen == []


def test_a_damaged_compile_cache_is_reported_and_not_used(tmp_path):
    from runner.checkpoint.store import COMPILE_CACHE_FILE, fetch_compile_cache, store_compile_cache

    first = _store(tmp_path)
    store_compile_cache(first, "k", b"kernels" * 1000)
    stored = tmp_path / "storage" / "run" / "compile-cache" / "k" / COMPILE_CACHE_FILE
    stored.write_bytes(b"x" * stored.stat().st_size)  # same size, other content
    second, bus = _store(tmp_path, workdir="elsewhere"), EventBus()
    seen = _warnings(bus)
    assert fetch_compile_cache(second, "k", bus) is None
    assert [w.kind for w in seen] == ["compile"] and "unusable" in seen[0].message
    assert not second.local("compile-cache/k").exists()
