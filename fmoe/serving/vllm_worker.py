"""Greedy generation in vLLM for a list of models, run by vLLM's own Python (it imports vLLM, never fmoe).

    VLLM_PYTHON -P fmoe/serving/vllm_worker.py JOB.json OUT.json     # -P: fmoe/serving/vllm.py must not shadow vllm

JOB: {"models": [{"path": DIR, "prompts": [[token ids]...], "max_tokens": N, "ignore_eos": bool, "warmup": bool, "repeats": n,
"engine": {...}}],
"engine": {LLM keyword args for every model}}. The engine runs in this process (no engine or worker processes), so a
model that fails to build reports its own exception.
OUT: {"results": [{"path": DIR, "tokens": [[ids]...], "logprobs": [[chosen-token logprob]...], "load_s": s,
"generate_s": s, "error": str | null}]}, written after each model. One engine at a time, in this process.
"""

import gc
import json
import os
import sys
import time


def main(job_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GB; unset, vLLM takes most of host memory for it
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(open(job_path).read())
    results = []
    for entry in job["models"]:
        result = {"path": entry["path"], "error": None}
        t0 = time.perf_counter()
        try:
            engine = {"distributed_executor_backend": "uni", **job.get("engine", {}), **entry.get("engine", {})}
            llm = LLM(model=entry["path"], **engine)
            result["load_s"] = time.perf_counter() - t0
            params = SamplingParams(temperature=0.0, max_tokens=entry["max_tokens"], logprobs=0,
                                    ignore_eos=entry.get("ignore_eos", False))
            prompts = [TokensPrompt(prompt_token_ids=p) for p in entry["prompts"]]
            if entry.get("warmup"):  # a first pass of the same shapes, untimed
                llm.generate(prompts, params, use_tqdm=False)
            result["generate_s"] = float("inf")
            for _ in range(entry.get("repeats", 1)):  # the fastest of `repeats` timed passes
                t1 = time.perf_counter()
                outputs = llm.generate(prompts, params, use_tqdm=False)
                result["generate_s"] = min(result["generate_s"], time.perf_counter() - t1)
            result["tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
            result["logprobs"] = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                                  for o in outputs]
            del llm
            gc.collect()
        except Exception as err:  # reported per model; the caller decides
            result["error"] = f"{type(err).__name__}: {err}"
        results.append(result)
        with open(out_path, "w") as f:
            json.dump({"results": results}, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
