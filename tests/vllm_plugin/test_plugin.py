"""The vLLM plug-in's parts that need no vLLM: options, the weight source, the mismatch checks,
the entry point, and that fastckpt never imports vLLM unless the plug-in is used."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from fastckpt.integrations.vllm.options import VllmLoadOptions, VllmOptionsError, parse_options
from fastckpt.integrations.vllm.weights import (
    CheckpointMismatchError,
    WeightsTracker,
    load_checked,
)

ROOT = Path(__file__).resolve().parents[2]


# --- options ---------------------------------------------------------------------------------


def test_options_default_and_values(tmp_path: Path) -> None:
    assert parse_options(None) == VllmLoadOptions()
    assert parse_options({}) == VllmLoadOptions()
    got = parse_options({"engine": "pread", "verify": True, "checkpoint": tmp_path})
    assert got == VllmLoadOptions(engine="pread", verify=True, checkpoint=str(tmp_path))
    assert parse_options({"server": "/run/fastckpt/sock"}).server == "/run/fastckpt/sock"


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"engin": "pread"}, ["unknown key", "'engin'", "accepted keys: engine"]),
        ({"loader": "x", "daemon": "y"}, ["'daemon', 'loader'"]),
        ({"engine": "aio"}, ["engine='aio'", "auto, uring, pread"]),
        ({"verify": "true"}, ["verify='true'", "JSON boolean"]),
        ({"checkpoint": ""}, ["checkpoint=''"]),
        ({"checkpoint": 3}, ["checkpoint=3"]),
        ({"server": ""}, ["server=''", "fastckpt serve"]),
    ],
)
def test_options_refused_with_clear_message(extra: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(VllmOptionsError) as err:
        parse_options(extra)
    for word in words:
        assert word in str(err.value)
    assert isinstance(err.value, ValueError)


def test_options_not_a_mapping() -> None:
    with pytest.raises(VllmOptionsError, match="must be a JSON object, got list"):
        parse_options(["engine"])  # type: ignore[arg-type]


# --- load_checked: mismatch errors -------------------------------------------------------------


class _T:
    """A stand-in tensor: load_checked only reads shape and dtype."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.dtype = "torch.bfloat16"


def _model(params: dict[str, tuple[int, ...]]):
    """A load_weights like vLLM models': KeyError on unknown names, AssertionError on shapes,
    returns the set of filled names."""

    def load_weights(weights: Any) -> set[str]:
        done = set()
        for name, t in weights:
            shape = params[name]
            assert shape == t.shape, f"{shape} != {t.shape}"
            done.add(name)
        return done

    return load_weights


def test_load_checked_accepts_a_matching_checkpoint() -> None:
    params = {"a": (2, 3), "b": (4,)}
    load_checked(
        _model(params),
        [(n, _T(s)) for n, s in params.items()],
        expected=set(params),
        checkpoint="ck",
        model="m",
    )


def test_load_checked_names_the_tensor_on_a_shape_mismatch() -> None:
    params = {"a": (2, 3), "b": (4,)}
    weights = [("a", _T((2, 3))), ("b", _T((5,)))]
    with pytest.raises(CheckpointMismatchError) as err:
        load_checked(_model(params), weights, expected=set(params), checkpoint="ck", model="m")
    msg = str(err.value)
    assert "checkpoint ck does not match model m" in msg
    assert "'b' (shape [5], bfloat16; tensor 2)" in msg
    assert "AssertionError" in msg


def test_load_checked_unknown_name() -> None:
    with pytest.raises(CheckpointMismatchError, match=r"at tensor 'zz'.*KeyError"):
        load_checked(
            _model({"a": (1,)}), [("zz", _T((1,)))], expected={"a"}, checkpoint="c", model="m"
        )


def test_load_checked_missing_parameters_and_empty_checkpoint() -> None:
    params = {f"p{i}": (1,) for i in range(12)}
    with pytest.raises(CheckpointMismatchError, match=r"11 parameter\(s\) were not in it: p1, p10"):
        load_checked(
            _model(params), [("p0", _T((1,)))], expected=set(params), checkpoint="c", model="m"
        )
    with pytest.raises(CheckpointMismatchError, match="holds no tensors"):
        load_checked(_model(params), [], expected=None, checkpoint="c", model="m")


def test_load_checked_passes_source_errors_through() -> None:
    from fastckpt.errors import ChecksumError

    def source():
        yield "a", _T((1,))
        raise OSError(5, "I/O error", "part-0")

    with pytest.raises(OSError, match="I/O error"):
        load_checked(_model({"a": (1,)}), source(), expected=None, checkpoint="c", model="m")

    def corrupt():
        raise ChecksumError("chunk 0 does not match", path="p")
        yield  # pragma: no cover

    with pytest.raises(ChecksumError):
        load_checked(_model({}), corrupt(), expected=None, checkpoint="c", model="m")


def test_tracker_counts_and_remembers_last() -> None:
    tracker = WeightsTracker([("a", _T((1, 2))), ("b", _T(()))])
    assert [n for n, _ in tracker] == ["a", "b"]
    assert tracker.count == 2
    assert tracker.last == ("b", (), "bfloat16")


# --- iter_weights: bytes equal to safetensors ---------------------------------------------------


def test_iter_weights_stock_and_converted_equal_safetensors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    import fastckpt
    from fastckpt.integrations.vllm.weights import iter_weights

    gen = torch.Generator().manual_seed(0)
    state = {
        "model.embed_tokens.weight": torch.randn(32, 8, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.randn(8, generator=gen),
        "lm_head.weight": torch.randn(32, 8, generator=gen).to(torch.float16),
        "step": torch.tensor(7, dtype=torch.int64),
    }
    stock = tmp_path / "stock"
    stock.mkdir()
    st.save_file(state, str(stock / "model.safetensors"))
    (stock / "config.json").write_text("{}")
    converted = tmp_path / "converted"
    fastckpt.convert(stock, converted)
    for folder, opts in [
        (stock, VllmLoadOptions()),
        (converted, VllmLoadOptions(engine="pread", verify=True)),
    ]:
        got = list(iter_weights(folder, opts))
        assert sorted(n for n, _ in got) == sorted(state)
        for name, tensor in got:
            assert tensor.device.type == "cpu"
            assert tensor.dtype == state[name].dtype and tensor.shape == state[name].shape
            assert torch.equal(
                tensor.reshape(-1).view(torch.uint8), state[name].reshape(-1).view(torch.uint8)
            )


def test_iter_weights_without_its_daemon_reads_the_files(tmp_path: Path) -> None:
    """A named daemon that is not there: the weights still come, read from the files."""
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    from fastckpt.integrations.vllm.weights import iter_weights

    state = {"w": torch.arange(12, dtype=torch.float32)}
    st.save_file(state, str(tmp_path / "model.safetensors"))
    opts = VllmLoadOptions(server=str(tmp_path / "no-daemon.sock"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warns once per process
        got = dict(iter_weights(tmp_path, opts))
    assert torch.equal(got["w"], state["w"])


def test_iter_weights_verify_on_stock_folder_is_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    from fastckpt.errors import FormatError
    from fastckpt.integrations.vllm.weights import iter_weights

    st.save_file({"w": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(FormatError, match="verify=True needs chunk checksums"):
        next(iter_weights(tmp_path, VllmLoadOptions(verify=True)))


# --- packaging and import direction -------------------------------------------------------------


def test_installed_package_declares_the_plugin_and_extra() -> None:
    """What vLLM looks up: the entry point of the installed distribution (re-install after
    editing pyproject.toml)."""
    from importlib import metadata

    plugins = [
        e for e in metadata.entry_points(group="vllm.general_plugins") if e.name == "fastckpt"
    ]
    assert [e.value for e in plugins] == ["fastckpt.integrations.vllm:register"]
    assert callable(plugins[0].load())
    from fastckpt._core_missing import DISTRIBUTION

    dist = metadata.distribution(DISTRIBUTION)  # "fastckpt-loader": PyPI's "fastckpt" is another
    assert "vllm" in (dist.metadata.get_all("Provides-Extra") or [])
    assert any('extra == "vllm"' in r and r.startswith("vllm") for r in dist.requires or [])


def test_fastckpt_does_not_import_vllm() -> None:
    code = (
        "import sys, fastckpt, fastckpt.integrations.vllm, fastckpt.integrations.vllm.options\n"
        "import fastckpt.integrations.vllm.weights\n"
        "bad = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')"
        " or m == 'torch')\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# --- iter_weights: one pass in windows, and the node's daemon -----------------------------------


def test_iter_weights_hands_over_the_first_tensor_before_reading_the_rest(tmp_path: Path) -> None:
    """One pass: the first tensor comes after at most two windows were read (the one handed
    over and the one read ahead), never after the whole checkpoint."""
    torch = pytest.importorskip("torch")
    import fastckpt
    from fastckpt.integrations.vllm.weights import iter_weights

    mib = 1 << 20
    state = {f"layer{i:02d}.w": torch.full((mib // 4,), float(i)) for i in range(16)}
    fastckpt.save(state, tmp_path / "ck", metadata=None)
    stats: list[fastckpt.LoadStats] = []
    with fastckpt.Loader(ring_slot_bytes=mib // 2) as loader:  # windows of 2 MiB
        weights = iter_weights(tmp_path / "ck", VllmLoadOptions(), loader=loader, stats=stats)
        name, first = next(weights)
        assert name == "layer00.w" and torch.equal(first, state[name])
        read_before = sum(s.read_nbytes for s in stats)
        assert 0 < read_before <= 4 * mib < 16 * mib
        rest = dict(weights)
    assert sorted([name, *rest]) == sorted(state)
    assert all(torch.equal(t, state[n]) for n, t in rest.items())
    assert sum(s.read_nbytes for s in stats) == 16 * mib
    assert len(stats) >= 8


def test_iter_weights_takes_the_bytes_from_the_nodes_daemon(tmp_path: Path) -> None:
    """With ``server`` set, the weights come from the daemon (a restart of vLLM's workers
    maps what the node's daemon holds) and equal the files' bytes."""
    torch = pytest.importorskip("torch")
    import threading

    import fastckpt
    from fastckpt.integrations.vllm.weights import iter_weights
    from fastckpt.serve.daemon import Daemon, ServeConfig

    root = tmp_path / "models"
    state = {f"w{i}": torch.randn(4096 + i) for i in range(6)}
    fastckpt.save(state, root / "m", metadata=None)
    sock = str(tmp_path / "run" / "sock")
    daemon = Daemon(ServeConfig(socket_path=sock, roots=[str(root)], dram_budget_bytes=8 << 20))
    daemon.bind()
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    try:
        for _ in range(2):  # the first start fills the daemon, the second is served by it
            stats: list[fastckpt.LoadStats] = []
            got = dict(iter_weights(root / "m", VllmLoadOptions(server=sock), stats=stats))
            assert all(torch.equal(got[n], t) for n, t in state.items())
        assert {s.path_taken for s in stats} == {"daemon"}
    finally:
        daemon.stop()
        thread.join(30)
    assert not thread.is_alive()


def test_vllm_export_without_vllm_says_which_python_to_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    from fastckpt.cli import main

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is importable here: the command would run it")
    assert main(["vllm-export", str(tmp_path), str(tmp_path / "out"), "-tp", "2"]) == 1
    err = capsys.readouterr().err
    assert "fastckpt vllm-export runs vLLM" in err and ".vllm-venv/bin/fastckpt" in err
    assert not (tmp_path / "out").exists()
