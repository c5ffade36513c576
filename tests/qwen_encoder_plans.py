"""The one-stage encoder-side plans the Qwen-family tests run on tiny towers (received attention in
place of CLS attention; the tiny towers' block indices)."""


def plan_for(method: str, keep: int) -> dict:
    score = {"name": "vision_attn", "layer": -1, "heads": "sum"}
    selectors = {
        "visionzip": {"name": "visionzip", "layer": -1, "contextual": 1, "keep_cls": False},
        "holov": {"name": "holov", "crops": 2},
        "scope": {"name": "scope"},
        "divprune": {"name": "divprune"},
        "pio_ve_qwen": {"name": "pio_ve_qwen", "local_layer": 1, "global_layer": -1, "window": 2},
    }
    stage = {"layer": 0, "keep": keep, "selector": selectors[method]}
    if method in ("visionzip", "holov", "scope"):
        stage["scorer"] = score
    return {"positions": "keep", "stages": [stage]}
