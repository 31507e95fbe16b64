"""Merge the device check's rows into one JSON and one Markdown table (``device_check.py report``)."""

from __future__ import annotations

import json
from pathlib import Path

GiB = 2**30


def _row(out: Path, name: str) -> dict:
    """A step's row, or why it is missing (the last line of its log)."""
    path = out / "rows" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    log = out / "logs" / f"{name}.log"
    lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return {"failed": lines[-1] if lines else "did not run"}


def _fmt(value, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def mode_lines(modes: dict[str, dict]) -> list[str]:
    lines = ["| mode | load s | peak GiB | estimate GiB | est/peak | TTFT turn 1 / 2 / 8, KV reuse (s) |"
             " TTFT turn 1 / 2 / 8, recompute (s) | decode tok/s | bound tok/s | decode/bound | reuse = recompute |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in modes.items():
        if "skipped" in row or "failed" in row:
            status = f"skipped: {row['skipped']}" if "skipped" in row else f"failed: {row['failed']}"
            lines.append(f"| {name} | {status} |" + " |" * 10)
            continue
        reuse, full = row["ttft_reuse_s"], row["ttft_full_s"]
        lines.append(
            f"| {name} ({row['runtime_mode']}, {row['device']}) | {row['load_s']:.1f} | {row['peak_bytes'] / GiB:.2f}"
            f" | {row['estimate_bytes'] / GiB:.2f} | {row['estimate_bytes'] / row['peak_bytes']:.2f}"
            f" | {reuse[0]:.3f} / {reuse[1]:.3f} / {reuse[-1]:.3f} | {full[0]:.3f} / {full[1]:.3f} / {full[-1]:.3f}"
            f" | {row['decode_tokens_per_s']:.1f} | {row['bandwidth_bound_tokens_per_s']:.1f}"
            f" | {row['decode_vs_bound']:.0%} | {'yes' if row['identical_greedy_reuse_vs_full'] else 'NO'} |")
    return lines


def vllm_lines(row: dict) -> list[str]:
    """The vLLM row: decode tokens/s at 1 and 8 users against the bandwidth bound."""
    if "skipped" in row or "failed" in row:
        return ["", f"- vLLM: {row.get('skipped') or 'failed: ' + row.get('failed', '')}"]
    return ["", f"- vLLM ({row['dtype']} on {row['device']}, server up in {row['start_s']:.0f} s, {row['new_tokens']}"
            f" greedy tokens a user): decode {row['decode_1_user_tokens_per_s']:.1f} tokens/s at 1 user"
            f" ({row['decode_1_vs_bound']:.0%} of the bound {row['bandwidth_bound_1_user_tokens_per_s']:.1f}),"
            f" {row['decode_8_users_tokens_per_s']:.1f} in total at 8 users"
            f" ({row['decode_8_users_per_user_tokens_per_s']:.1f} each; {row['speedup_8_vs_1']:.1f}x one user;"
            f" {row['decode_8_vs_8x_bound']:.0%} of 8x the bound)."]


def other_lines(rows: dict[str, dict]) -> list[str]:
    agreement, medclip, build = rows["agreement"], rows["medclip"], rows["build"]
    lines = vllm_lines(rows["vllm"])
    if "compared" in agreement:
        verdict = ("identical" if agreement["identical"]
                   else f"first difference at generated token {agreement['first_difference']}")
        lines.append(f"- Greedy agreement on the tiny fixture, {agreement['compared']}: {verdict}"
                     f" ({agreement['tokens']} tokens over two turns).")
    else:
        lines.append(f"- Greedy agreement: {agreement.get('skipped') or 'failed: ' + agreement.get('failed', '')}")
    if "images" in medclip:
        lines.append(f"- MedCLIP-ViT ({medclip.get('size', 'real size')}, random weights, released layout) on"
                     f" {medclip['device']}: load"
                     f" {medclip['load_s']:.1f} s; 20 images {medclip['first_call_s']:.2f} s with prompt encoding,"
                     f" {medclip['cached_prompts_s']:.2f} s with cached prompts"
                     f" ({medclip['ms_per_image']:.1f} ms/image).")
    else:
        lines.append(f"- MedCLIP: {medclip.get('skipped') or 'failed: ' + medclip.get('failed', '')}")
    if "scale" in build:
        lines.append(f"- Checkpoints: scale {build['scale']:g} in {build['folder']} ({build['build_s']:.0f} s).")
    return lines


def write_report(out: Path, environment: dict, mode_names: tuple[str, ...], quick: bool = False) -> int:
    """Write ``device_check.json`` and ``device_check.md`` into ``out``; 0 when no step failed."""
    modes = {name: _row(out, name) for name in mode_names}
    rows = {name: _row(out, name) for name in ("build", "agreement", "medclip", "vllm")}
    if quick:  # the short profile leaves these out on purpose
        rows.update({name: {"skipped": "not in --quick"} for name in ("agreement", "medclip")})
    report = {"environment": environment, "modes": modes, **rows}
    (out / "device_check.json").write_text(json.dumps(report, indent=1))
    env = environment
    title = "Device check (DRY RUN on the CPU, mid-size dims)" if env["dry_run"] else "Device check"
    title += " (--quick)" if quick else ""
    lines = [f"# {title}", "",
             f"{env['gpu'] or 'CPU'}; torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']},"
             f" bitsandbytes {env['bitsandbytes'] or 'absent'}, Python {env['python']}.", "",
             "Peak: GPU `max_memory_allocated` + the estimate's CUDA-context allowance (dry run: RssAnon peak +"
             " the 1 GiB process allowance). Bound: device-to-device copy bandwidth / weight bytes read per token.",
             "", *mode_lines(modes), *other_lines(rows)]
    (out / "device_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if any("failed" in row for row in [*modes.values(), *rows.values()]) else 0
