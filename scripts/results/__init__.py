"""What scripts/results_table.py and scripts/plot_results.py share: reading a pipeline run folder (`runs`) and
the statistics over seeds (`stats`). Neither imports torch. The modules are imported by name; nothing is
re-exported here.
"""
