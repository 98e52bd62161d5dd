"""The ``nograd`` command line: the ``merge`` subcommand (``nograd merge frank --mllm ... --out ...``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as tf

import tiny
from nograd.cli import build_parser, main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    base = tiny.build("qwen2", vocab_size=160, num_hidden_layers=2, max_position_embeddings=512, rms_norm_eps=1e-5)
    mllm = tiny.build("qwen2_5_vl")
    mllm.get_decoder().load_state_dict(base.model.state_dict())
    reasoning = tiny.build("qwen2", seed=1, vocab_size=160, num_hidden_layers=2, max_position_embeddings=512,
                           rms_norm_eps=1e-5)
    for name, model in (("mllm", mllm), ("reasoning", reasoning), ("base", base)):
        model.save_pretrained(folder / name)
    return folder


def test_merge_subcommand(folders, tmp_path, capsys):
    f = folders
    status = main(["merge", "frank", "--mllm", str(f / "mllm"), "--reasoning", str(f / "reasoning"), "--base",
                   str(f / "base"), "--out", str(tmp_path / "out"), "--prior", "1,0", "--report",
                   str(tmp_path / "report.json")])
    assert status == 0
    printed = capsys.readouterr().out
    assert "lambda_r" in printed and "wrote 1 file(s)" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["lambda_r"] == [0.0, 1.0] and report["pi_v"] == [1.0, 0.0]
    loaded = tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out")
    reasoning = tf.Qwen2ForCausalLM.from_pretrained(f / "reasoning")
    assert torch.equal(loaded.get_decoder().layers[1].mlp.up_proj.weight, reasoning.model.layers[1].mlp.up_proj.weight)


def test_merge_options_and_errors(folders, tmp_path, capsys):
    f = folders
    args = build_parser().parse_args(["merge", "--mllm", "a", "--reasoning", "b", "--out", "c", "--rule", "linear",
                                      "--lambda-r", "0.25", "--layers", "1:", "--weights", "0.5,1"])
    assert (args.method, args.rule, args.lambda_r, args.layers, args.weights) == ("frank", "linear", 0.25, (1, None),
                                                                                 [0.5, 1.0])
    status = main(["merge", "frank", "--mllm", str(f / "mllm"), "--reasoning", str(f / "reasoning"), "--out",
                   str(tmp_path / "out")])
    assert status == 2 and "option base=None" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["merge", "--mllm", "a"])
    trio = ["--mllm", str(f / "mllm"), "--reasoning", str(f / "reasoning"), "--base", str(f / "base")]
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(["merge", "frank", *trio, "--out", str(a_file)]) == 2
    assert "out must be a folder" in capsys.readouterr().err
    # a report path that cannot be written is refused before anything is merged
    status = main(["merge", "frank", *trio, "--out", str(tmp_path / "never"), "--report", str(tmp_path / "no/r.json")])
    assert status == 2 and "--report" in capsys.readouterr().err and not (tmp_path / "never").exists()
    (tmp_path / "a_folder").mkdir()  # a folder: it was found only after the merge (a traceback, exit 1)
    status = main(["merge", "frank", *trio, "--out", str(tmp_path / "never"), "--report", str(tmp_path / "a_folder")])
    assert status == 2 and "not a file that can be written" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_main_module(monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["nograd", "merge", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("nograd", run_name="__main__")
    assert exit_.value.code == 0 and "--reasoning" in capsys.readouterr().out


@pytest.mark.slow
def test_python_dash_m(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-m", "nograd", "merge", "--help"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0 and "--reasoning" in result.stdout


def test_a_reader_that_leaves_ends_the_listing_quietly(monkeypatch):
    """``nograd list | head``: the pipe closes under the listing; the command stops with the shell's 141, no
    traceback."""
    from nograd import cli

    read, write = os.pipe()
    os.close(read)
    stdout = open(write, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        assert cli.main(["list"]) == 141
    finally:
        monkeypatch.undo()
        stdout.close()
