"""What loading the base model costs and needs: the fp16 weight variant (half the download when the
weights end up in fp16 anyway, with the default files as fallback), and the compile cache on a torch
older than 2.7 (no save/load_cache_artifacts)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from runner.profile import ModelConfig, fingerprint, load_profile
from runner.train import compiling, loading, testmodels
from tests.platforms import REPO
from tests.platforms.hub_download import HubDownloadServer

PIECES = ("unet", "vae", "text_encoder", "text_encoder_2")


def lay_out_repo(folder, *, fp16: bool, fp16_seed: int | None = None) -> None:
    """A tiny SDXL repo as the Hub lays SDXL base 1.0 out; with fp16=True also `*.fp16.safetensors`
    (the same weights cast to fp16, or those of `fp16_seed` to tell the files apart)."""
    parts = testmodels.build_tiny(3)
    other = testmodels.build_tiny(fp16_seed) if fp16_seed is not None else parts
    for name in PIECES:
        getattr(parts, name).save_pretrained(folder / name)
        if fp16:
            getattr(other, name).to(torch.float16).save_pretrained(folder / name, variant="fp16")
    parts.tokenizer.save_pretrained(folder / "tokenizer")
    parts.tokenizer_2.save_pretrained(folder / "tokenizer_2")


LOAD = """
import json, sys, torch
from runner.profile import ModelConfig
from runner.train.loading import load_parts
out = {}
for repo, dtype in json.loads(sys.argv[1]):
    parts = load_parts(ModelConfig(base=repo), dtype=getattr(torch, dtype) if dtype else None)
    out[repo] = {"unet": parts.unet.conv_in.weight.half().flatten()[:64].tolist(), "dtype": str(parts.unet.dtype)}
print(json.dumps(out))
"""


def test_fp16_training_downloads_the_fp16_files_and_falls_back_without_them(tmp_path):
    with_fp16, without = tmp_path / "with-fp16", tmp_path / "without"
    lay_out_repo(with_fp16, fp16=True)
    lay_out_repo(without, fp16=False)
    # one repo folder under two ids: each id has its own cache, so each load downloads
    repos = {"sdxl/with-fp16": with_fp16, "sdxl/with-fp16-fp32": with_fp16, "sdxl/without": without}
    loads = [["sdxl/with-fp16", "float16"], ["sdxl/without", "float16"], ["sdxl/with-fp16-fp32", None]]
    with HubDownloadServer(repos) as hub:
        env = {**hub.env(tmp_path / "hf-home"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-c", LOAD, json.dumps(loads)], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        got = {repo: hub.downloaded(repo) for repo in repos}
    weights = {
        repo: {f: n for f, n in files.items() if f.endswith((".safetensors", ".bin"))} for repo, files in got.items()
    }

    def size(folder, piece, name):
        return (folder / piece / name).stat().st_size

    unet16, unet32 = "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"
    # fp16 training: the fp16 UNet and text encoders, never their fp32 files; the VAE (encoded in fp32) in fp32
    assert weights["sdxl/with-fp16"] == {
        f"unet/{unet16}": size(with_fp16, "unet", unet16),
        "vae/diffusion_pytorch_model.safetensors": size(with_fp16, "vae", unet32),
        "text_encoder/model.fp16.safetensors": size(with_fp16, "text_encoder", "model.fp16.safetensors"),
        "text_encoder_2/model.fp16.safetensors": size(with_fp16, "text_encoder_2", "model.fp16.safetensors"),
    }
    assert size(with_fp16, "unet", unet16) < 0.6 * size(with_fp16, "unet", unet32)
    # a repo without fp16 files: the default ones, the session goes on
    assert set(weights["sdxl/without"]) == {f"unet/{unet32}", f"vae/{unet32}", "text_encoder/model.safetensors",
                                           "text_encoder_2/model.safetensors"}  # fmt: skip
    # fp32 (a CPU run): the default files even where fp16 ones exist
    assert set(weights["sdxl/with-fp16-fp32"]) == set(weights["sdxl/without"])
    # same numbers either way: the fp16 files are the fp32 weights cast, as a cast after loading gives
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["sdxl/with-fp16"]["unet"] == out["sdxl/without"]["unet"]
    assert out["sdxl/with-fp16"]["dtype"] == "torch.float16"


def test_local_folder_uses_fp16_files_only_where_it_has_them(tmp_path):
    lay_out_repo(tmp_path / "both", fp16=True, fp16_seed=4)  # fp16 files hold other weights: which was read shows
    lay_out_repo(tmp_path / "plain", fp16=False)
    fp16_unet = testmodels.build_tiny(4).unet.to(torch.float16)
    plain_unet = testmodels.build_tiny(3).unet.to(torch.float16)
    both = loading.load_parts(ModelConfig(base=str(tmp_path / "both")), text=False, vae=False, dtype=torch.float16)
    assert torch.equal(both.unet.conv_in.weight, fp16_unet.conv_in.weight)
    as_fp32 = loading.load_parts(ModelConfig(base=str(tmp_path / "both")), text=False, vae=False)
    assert torch.equal(as_fp32.unet.conv_in.weight, testmodels.build_tiny(3).unet.conv_in.weight)
    plain = loading.load_parts(ModelConfig(base=str(tmp_path / "plain")), text=False, vae=False, dtype=torch.float16)
    assert torch.equal(plain.unet.conv_in.weight, plain_unet.conv_in.weight)


def test_variant_choice_is_a_download_detail():
    auto = ModelConfig(base="stabilityai/stable-diffusion-xl-base-1.0")
    assert loading.download_variant(auto, torch.float16) == ("fp16", True)
    assert loading.download_variant(auto, torch.bfloat16) == (None, False)  # fp16 → bf16 would round twice
    assert loading.download_variant(auto, None) == (None, False)
    assert loading.download_variant(ModelConfig(variant="fp16"), None) == ("fp16", False)  # asked for: no fallback
    # the profile (and so the fingerprint a stored run compares) is what it was before variants were chosen
    profile = load_profile("sdxl-naruto-t4")
    assert profile.model.variant == "" and fingerprint(profile) == fingerprint(load_profile("sdxl-naruto-t4"))


def test_only_a_missing_variant_file_falls_back():
    hub_missing = OSError("sdxl does not appear to have a file named diffusion_pytorch_model.fp16.bin.")
    folder_missing = OSError("Error no file named model.fp16.safetensors found in directory /m.")
    offline = OSError("There was a specific connection error when trying to load sdxl:\n…/unet/x.fp16.safetensors")
    assert loading._is_missing_variant(hub_missing, "fp16") and loading._is_missing_variant(folder_missing, "fp16")
    assert not loading._is_missing_variant(offline, "fp16")
    assert not loading._is_missing_variant(OSError("does not appear to have a file named config.json"), "fp16")


# ---------------------------------------------------------------- torch < 2.7: no compile cache API


def test_compile_cache_is_skipped_with_a_note_on_torch_without_the_api(monkeypatch, caplog):
    for name in ("save_cache_artifacts", "load_cache_artifacts"):
        monkeypatch.delattr(torch.compiler, name, raising=False)
    assert not compiling.has_compile_cache_api()
    with caplog.at_level(logging.INFO, logger=compiling.log.name):
        assert compiling.compile_artifacts() is None
        compiling.load_compile_artifacts(b"kernels from another session")  # no AttributeError: a no-op
    assert "torch 2.7" in caplog.text and "compile" in caplog.text


@pytest.mark.skipif(not hasattr(torch.compiler, "save_cache_artifacts"), reason="torch < 2.7")
def test_compile_cache_api_is_used_where_it_exists():
    assert compiling.has_compile_cache_api()
    assert compiling.compile_artifacts() is None or isinstance(compiling.compile_artifacts(), bytes)
