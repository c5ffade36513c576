"""The plugin model under ``accelerate launch`` / torchrun: lmms-eval hands each process the
requests of its ``RANK``; the model takes the device of its ``LOCAL_RANK`` (CPU here), exposes it
as ``lm.device`` (lmms-eval's evaluator gathers request counts there) and writes its own trace file."""

from __future__ import annotations

import json

import torch

from tokenreduce.testing.tiny import save_tiny_checkpoint


def test_each_process_of_a_launch_has_its_device_and_its_own_trace_file(lmms_eval, tmp_path, monkeypatch):
    from lmms_eval.models import get_model

    ckpt = save_tiny_checkpoint(tmp_path / "llava", "llava", text_layers=4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    trace = tmp_path / "trace.jsonl"
    lm = get_model("tokenreduce").create_from_arg_string(
        f"pretrained={ckpt},plan=random_50,trace_file={trace}",
        {"batch_size": 1, "max_batch_size": None, "device": None},
    )
    expected = torch.device("cuda", 1 % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    assert lm.device == lm.loaded.device == expected
    assert lm.args.trace_file == str(tmp_path / "trace.rank1.jsonl")
    from lmms_eval.api.instance import Instance
    from PIL import Image

    doc = {"image": Image.new("RGB", (64, 64), "red")}
    lm.task_dict = {"toy": {"test": [doc]}}
    req = Instance(
        request_type="generate_until",
        arguments=("what color?", {"max_new_tokens": 2}, lambda d: [d["image"]], 0, "toy", "test"),
        idx=0,
        metadata={"task": "toy", "doc_id": 0, "repeats": 1},
    )
    assert len(lm.generate_until([req])) == 1
    assert [json.loads(line)["doc_id"] for line in (tmp_path / "trace.rank1.jsonl").read_text().splitlines()] == [0]
    assert not trace.exists()
