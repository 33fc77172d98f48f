"""The tools, each run from the repository root as `python -m scripts.<tool>` (every one answers --help):

    pipeline         the four stages of one setting (bash scripts/run_pipeline.sh is its wrapper)
    reproduce_paper  the paper's experiments over the pipeline (bash scripts/reproduce_paper.sh)
    results_table    the table of finished runs
    keep_summaries   a run's small summaries copied apart (no checkpoint), as docs/results/ keeps them
    plot_results     their figures
    benchmark        each stage's speed on this machine (bench_tools: its timing helpers)
    repeat_tests     chosen tests in a loop, to hunt a flaky one

scripts/demo.sh runs the demo and scripts/gpu_check.sh checks a GPU machine. The tools that investigate the
implementation itself, rather than use it, are in scripts/investigate/.
"""
