"""``convert``: every source layout, carried files, refusals; the memory benchmark's smoke run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _readback import assert_bitwise_equal, check_partitions, read_back
from safetensors.torch import save_file

import fastckpt
from fastckpt.errors import FormatError, SourceError
from fastckpt.format.sources import is_weight_file

ROOT = Path(__file__).resolve().parents[2]


def small_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": torch.randn(32, 8, generator=g),
        "model.layers.0.w": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "model.layers.1.w": torch.randn(8, 8, generator=g).to(torch.float16),
        "model.norm.scale": torch.tensor(1.5),
        "model.mask": torch.tensor([True, False]),
        "model.counts": torch.arange(9, dtype=torch.int64),
    }


def write_carried(root: Path) -> list[str]:
    files = {
        "config.json": '{"model_type": "llama"}',
        "generation_config.json": "{}",
        "tokenizer.json": '{"version": "1.0"}',
        "tokenizer_config.json": "{}",
        "special_tokens_map.json": "{}",
        "tokenizer.model": "\x00sentencepiece",
        "merges.txt": "a b\n",
        "vocab.json": "{}",
        "chat_template.jinja": "{{ messages }}",
        "README.md": "# model",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    return sorted(files)


def write_sharded_bin(root: Path, sd: dict[str, torch.Tensor], nshards: int = 2) -> None:
    names = list(sd)
    weight_map = {}
    for k in range(nshards):
        shard = f"pytorch_model-{k + 1:05d}-of-{nshards:05d}.bin"
        part = {n: sd[n] for n in names[k::nshards]}
        torch.save(part, root / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (root / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


# --- single files -------------------------------------------------------------------------------


def test_single_safetensors_file_keeps_metadata(tmp_path) -> None:
    sd = small_state_dict()
    save_file(sd, tmp_path / "m.safetensors", metadata={"format": "pt", "note": "x"})
    index = fastckpt.convert(
        tmp_path / "m.safetensors", tmp_path / "ck", metadata={"note": "mine", "k": "v"}
    )
    assert dict(index.metadata) == {"format": "pt", "note": "mine", "k": "v"}
    assert index.source["kind"] == "safetensors"
    assert index.source["path"] == str(tmp_path / "m.safetensors")
    assert index.files == ()
    check_partitions(index)
    assert_bitwise_equal(sd, read_back(tmp_path / "ck"))


@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".weights"])
def test_torch_files(tmp_path, zip_format, suffix) -> None:
    sd = small_state_dict()
    sd["tied"] = sd["model.embed.weight"]
    src = tmp_path / f"w{suffix}"
    torch.save(sd, src, _use_new_zipfile_serialization=zip_format)
    index = fastckpt.convert(src, tmp_path / "ck")
    assert index.source["kind"] == "torch" and index.source["format"] == "torch"
    assert dict(index.aliases) == {"tied": "model.embed.weight"}
    assert_bitwise_equal(sd, read_back(tmp_path / "ck"))


def test_torch_zip_source_is_memory_mapped(tmp_path, monkeypatch) -> None:
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    torch.save({"a": torch.ones(3)}, tmp_path / "z.bin")
    torch.save({"a": torch.ones(3)}, tmp_path / "l.bin", _use_new_zipfile_serialization=False)
    fastckpt.convert(tmp_path / "z.bin", tmp_path / "ck1")
    fastckpt.convert(tmp_path / "l.bin", tmp_path / "ck2")
    assert [c.get("mmap", False) for c in calls] == [True, False]
    assert all(c["weights_only"] is True for c in calls)


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_views_and_byte_ranges(tmp_path, zip_format) -> None:
    from fastckpt.format.sources import open_source
    from fastckpt.format.stored import FileRange, TorchTensor

    base = torch.arange(600, dtype=torch.float32)
    sd = {
        "whole": torch.randn(10, 10).to(torch.bfloat16),
        "slice": base[100:300],  # storage offset, shares storage with the next two
        "grid": base[:300].view(30, 10),
        "transposed": base[:300].view(30, 10).t(),  # non-contiguous
        "scalar": torch.tensor(7, dtype=torch.int8),
        "empty": torch.empty(0, 3),
    }
    src = tmp_path / "w.bin"
    torch.save(sd, src, _use_new_zipfile_serialization=zip_format)
    with open_source(src) as source:
        kinds = {t.name: type(t) for t in source.tensors}
    if zip_format:  # contiguous tensors are read with pread, not through the mapping
        assert kinds["whole"] is FileRange and kinds["slice"] is FileRange
        assert kinds["transposed"] is TorchTensor and kinds["empty"] is TorchTensor
    else:
        assert set(kinds.values()) == {TorchTensor}
    fastckpt.convert(src, tmp_path / "ck", partition_bytes=4096)
    assert_bitwise_equal(sd, read_back(tmp_path / "ck"))


class Payload:
    """Unpickling this would run code; weights_only refuses it."""

    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_with_objects_is_refused(tmp_path, zip_format, capfd) -> None:
    src = tmp_path / "evil.bin"
    with open(src, "wb") as f:
        if zip_format:
            torch.save({"w": torch.zeros(2), "x": Payload()}, f)
        else:
            torch.save(
                {"w": torch.zeros(2), "x": Payload()}, f, _use_new_zipfile_serialization=False
            )
    with pytest.raises(SourceError, match="objects other than tensors") as info:
        fastckpt.convert(src, tmp_path / "ck")
    assert "GLOBAL print" in str(info.value)
    assert info.value.path == str(src)
    assert "pwned" not in capfd.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["evil.bin"]


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([torch.zeros(1)], "not a state dict"),
        ({"a": 3}, "'a' is a int, not a tensor"),
        ({"state_dict": {"a": torch.zeros(1)}}, "nested dict"),
        ({1: torch.zeros(1)}, "not a string"),
    ],
)
def test_torch_non_state_dicts_refused(tmp_path, obj, match) -> None:
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(SourceError, match=match):
        fastckpt.convert(tmp_path / "x.pt", tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        (b"garbage" * 10, "x.bin", "not a readable PyTorch checkpoint"),
        (b"PK\x03\x04" + b"junk" * 10, "x.pt", "not a readable PyTorch checkpoint"),
        (b"", "x.pth", "not a readable PyTorch checkpoint"),
        (b"hello world", "x.txt", "not a recognised checkpoint file"),
    ],
)
def test_junk_files_refused(tmp_path, content, name, match) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SourceError, match=match):
        fastckpt.convert(tmp_path / name, tmp_path / "ck")


def test_bad_safetensors_raises_format_error(tmp_path) -> None:
    (tmp_path / "m.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(FormatError):
        fastckpt.convert(tmp_path / "m.safetensors", tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_missing_source(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        fastckpt.convert(tmp_path / "nope", tmp_path / "ck")


def test_fastckpt_index_file_is_not_a_source(tmp_path) -> None:
    fastckpt.save({"a": torch.zeros(1)}, tmp_path / "a")
    with pytest.raises(SourceError, match="pass the checkpoint directory"):
        fastckpt.convert(tmp_path / "a" / "fastckpt.index", tmp_path / "ck")


# --- directories --------------------------------------------------------------------------------


def test_sharded_safetensors_dir(tmp_path) -> None:
    sd = small_state_dict()
    src = tmp_path / "src"
    src.mkdir()
    names = list(sd)
    weight_map = {}
    for k, shard in enumerate(["a.safetensors", "b.safetensors"]):
        part = {n: sd[n] for n in names[k::2]}
        save_file(part, src / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    index = fastckpt.convert(src, tmp_path / "ck")
    assert index.source["kind"] == "directory"
    assert sorted(index.source["weights"]) == ["a.safetensors", "b.safetensors"]
    assert index.files == ()  # weights and their index are not carried
    assert_bitwise_equal(sd, read_back(tmp_path / "ck"))


@pytest.mark.parametrize("weights", ["safetensors", "bin", "bin-sharded", "other-name"])
def test_transformers_dir_carries_files(tmp_path, weights) -> None:
    sd = small_state_dict()
    src = tmp_path / "model"
    src.mkdir()
    carried = write_carried(src)
    if weights == "safetensors":
        save_file(sd, src / "model.safetensors")
    elif weights == "bin":
        torch.save(sd, src / "pytorch_model.bin")
    elif weights == "bin-sharded":
        write_sharded_bin(src, sd)
    else:
        save_file(sd, src / "consolidated.safetensors")
    # never carried: other weights, hidden files, pickles; sub-folders go to the tree
    torch.save({"x": torch.zeros(1)}, src / "training_args.bin")
    (src / ".gitattributes").write_text("*")
    (src / "sub").mkdir()
    (src / "sub" / "f.txt").write_text("x")
    index = fastckpt.convert(src, tmp_path / "ck")
    assert index.source["kind"] == "transformers"
    assert sorted(index.files) == carried
    assert index.tree == ("sub/f.txt",)
    for name in carried:
        assert (tmp_path / "ck" / name).read_bytes() == (src / name).read_bytes()
    expected = sorted([*carried, "fastckpt.index", "part-00000.fckpt", "sub"])
    assert sorted(os.listdir(tmp_path / "ck")) == expected
    assert_bitwise_equal(sd, read_back(tmp_path / "ck"))


def test_hf_cache_style_symlinks_are_followed(tmp_path) -> None:
    # The Hugging Face cache layout: <repo>/snapshots/<rev>/<file> -> ../../blobs/<hash>.
    blobs = tmp_path / "repo" / "blobs"
    blobs.mkdir(parents=True)
    snap = tmp_path / "repo" / "snapshots" / "rev"
    snap.mkdir(parents=True)
    sd = small_state_dict()
    save_file(sd, blobs / "b1")
    (blobs / "b2").write_text('{"model_type": "x"}')
    (snap / "model.safetensors").symlink_to("../../blobs/b1")
    (snap / "config.json").symlink_to("../../blobs/b2")
    index = fastckpt.convert(snap, tmp_path / "ck")
    assert index.files == ("config.json",)
    assert not os.path.islink(tmp_path / "ck" / "config.json")
    assert (tmp_path / "ck" / "config.json").read_text() == '{"model_type": "x"}'
    assert_bitwise_equal(sd, read_back(tmp_path / "ck"))


def test_torch_shard_index_mismatch(tmp_path) -> None:
    sd = small_state_dict()
    write_sharded_bin(tmp_path, sd)
    doc = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    doc["weight_map"]["ghost"] = "pytorch_model-00001-of-00002.bin"
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(doc))
    with pytest.raises(SourceError, match=r"'ghost'.*is missing"):
        fastckpt.convert(tmp_path, tmp_path.parent / "ck_mismatch")


@pytest.mark.parametrize(
    ("weight_map", "match"),
    [
        ({"a": "../evil.bin"}, "path separator"),
        ({"a": "absent.bin"}, "missing"),
        ({}, "weight_map"),
    ],
)
def test_torch_shard_index_refusals(tmp_path, weight_map, match) -> None:
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(SourceError, match=match):
        fastckpt.convert(tmp_path, tmp_path.parent / "ck_refused")


def test_unknown_dir_layout_names_what_was_looked_for(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "flax_model.msgpack").write_bytes(b"\x00")
    with pytest.raises(SourceError, match=r"model\.safetensors.*pytorch_model\.bin"):
        fastckpt.convert(tmp_path, tmp_path.parent / "ck_unknown")


def test_sharded_dir_without_index_json(tmp_path) -> None:
    """Issue #9: shards without model.safetensors.index.json convert as load reads them."""
    save_file({"a": torch.zeros(1)}, tmp_path / "x.safetensors")
    save_file({"b": torch.ones(2)}, tmp_path / "y.safetensors")
    (tmp_path / "config.json").write_text("{}")
    index = fastckpt.convert(tmp_path, tmp_path.parent / "ck_shards")
    assert sorted(index.tensors) == ["a", "b"]
    assert index.files == ("config.json",)
    assert_bitwise_equal(fastckpt.load(tmp_path), read_back(tmp_path.parent / "ck_shards"))
    save_file({"a": torch.ones(1)}, tmp_path / "z.safetensors")
    with pytest.raises(fastckpt.FormatError, match="two shards"):
        fastckpt.convert(tmp_path, tmp_path.parent / "ck_dup")


def test_peft_dir_refusals(tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(SourceError, match="no adapter_model"):
        fastckpt.convert(tmp_path, tmp_path.parent / "ck1")
    (tmp_path / "adapter_config.json").unlink()
    save_file({"a": torch.zeros(1)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(SourceError, match=r"no adapter_config\.json"):
        fastckpt.convert(tmp_path, tmp_path.parent / "ck2")


def test_destination_inside_source_dir(tmp_path) -> None:
    sd = small_state_dict()
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    fastckpt.convert(tmp_path, tmp_path / "fast")
    assert_bitwise_equal(sd, read_back(tmp_path / "fast"))
    # converting again: the earlier output (a directory) is neither weights nor carried
    index = fastckpt.convert(tmp_path, tmp_path / "fast", overwrite=True)
    assert index.files == ("config.json",)


def test_fastckpt_in_place_repartition(tmp_path) -> None:
    sd = small_state_dict()
    fastckpt.save(sd, tmp_path / "ck")
    index = fastckpt.convert(tmp_path / "ck", tmp_path / "ck", overwrite=True, partition_bytes=512)
    assert len(index.partitions) > 1
    assert_bitwise_equal(sd, read_back(tmp_path / "ck"))


def test_is_weight_file() -> None:
    for name in ["model.safetensors", "pytorch_model.bin", "x.pt", "a.pth", "model.ckpt", "m.gguf",
                 "model.safetensors.index.json", "pytorch_model.bin.index.json", "part-00000.fckpt",
                 "fastckpt.index", "tf_model.h5", "flax_model.msgpack"]:  # fmt: skip
        assert is_weight_file(name), name
    for name in ["config.json", "tokenizer.json", "tokenizer.model", "merges.txt", "vocab.txt",
                 "chat_template.jinja", "preprocessor_config.json", "README.md"]:  # fmt: skip
        assert not is_weight_file(name), name


# --- real transformers / peft directories ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model


def test_transformers_save_pretrained_sharded(tmp_path, tiny_llama) -> None:
    src = tmp_path / "hf"
    tiny_llama.save_pretrained(src, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").exists()
    (src / "tokenizer.json").write_text('{"model": {}}')
    index = fastckpt.convert(
        src, tmp_path / "ck", device_map={"model.layers.1": "cuda:1", "": "cuda:0"}
    )
    assert index.source["kind"] == "transformers"
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(index.files)
    assert [p.device for p in index.partitions] == ["cuda:0", "cuda:1"]
    back = read_back(tmp_path / "ck")
    expected = {k: v for k, v in tiny_llama.state_dict().items() if k in back}
    assert "model.embed_tokens.weight" in expected and len(expected) == len(back)
    assert_bitwise_equal(expected, back)


def test_peft_adapter_dir(tmp_path, tiny_llama) -> None:
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(tiny_llama, lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # B starts at zero; make it non-trivial
    src = tmp_path / "adapter"
    model.save_pretrained(src)
    model.unload()
    assert (src / "adapter_model.safetensors").exists()
    index = fastckpt.convert(src, tmp_path / "ck")
    assert index.source["kind"] == "peft"
    assert "adapter_config.json" in index.files
    from safetensors.torch import load_file

    expected = load_file(src / "adapter_model.safetensors")
    assert any("lora_A" in k for k in expected)
    assert_bitwise_equal(expected, read_back(tmp_path / "ck"))


def test_peft_bin_adapter_dir(tmp_path) -> None:
    sd = {"base_model.model.q.lora_A.weight": torch.randn(2, 8)}
    torch.save(sd, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text('{"r": 2}')
    index = fastckpt.convert(tmp_path, tmp_path.parent / "ck_bin_adapter")
    assert index.source["kind"] == "peft" and index.files == ("adapter_config.json",)
    assert_bitwise_equal(sd, read_back(tmp_path.parent / "ck_bin_adapter"))
