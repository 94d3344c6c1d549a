"""The JSON of a side-by-side benchmark run, rewritten after every change (a run cut short keeps
what it measured). The benchmarks' own `Report`s add their records on top of this one."""

from __future__ import annotations

import json
import os

import torch


class RunReport:
    """`data` is the run's JSON; it is written to `out` (nowhere when None) after every change."""

    def __init__(self, out: str | None, data: dict) -> None:
        self.out, self.data = out, data

    def engine_start(self, system: str, seconds: float) -> None:
        """A system's engine start time (kept out of every timing)."""
        self.data["engine_start_s"][system] = seconds
        self.save()

    def peer(self, res: dict) -> None:
        """What the vLLM peer reported about itself (vattn_ray/bench/vllm_peer.py `launch`)."""
        if res.get("available") is False:
            self.data["versions"]["vllm"] = {"available": False, "reason": res["reason"]}
        else:
            self.data["versions"]["vllm"] = res.get("versions")
            self.data["vllm_engine_args"] = res.get("engine_args")
            self.data["vllm_parallel"] = res.get("parallel")  # the TP size vLLM reports it ran with
            if "engine_start_s" in res:
                self.data["engine_start_s"]["vllm"] = res["engine_start_s"]
        self.save()

    def save(self) -> None:
        if self.out:
            tmp = self.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=2)
            os.replace(tmp, self.out)  # a reader never sees half a file


def resolve_checkpoint(args) -> tuple[dict, torch.device, str]:
    """Resolve `args.model` to a local checkpoint (in place); its Hugging Face config, the device,
    and the one dtype every system of the run uses."""
    from vattn_ray.config import read_hf_config, resolve_device, resolve_dtype, resolve_model_path

    args.model = resolve_model_path(args.model)
    hf = read_hf_config(args.model)
    device = torch.device(resolve_device(args.device))
    return hf, device, resolve_dtype(args.dtype, hf, device.type)
