"""``anomos lab``: anonymity figures per path policy, under adversaries and churn.

The layout follows the experiment:

- :mod:`anomos.lab.experiment`: what to run (a TOML file or flags), checked;
- :mod:`anomos.lab.schedule`: who is online and who downloads when, from the
  seed alone, the same for every policy;
- :mod:`anomos.lab.run`: one policy and one seed on the tracker's own graph,
  neighbour assignment and planner step (:func:`anomos.tracker.simulate.plan_circuit`),
  with a simulated clock;
- :mod:`anomos.lab.metrics`: the definitions (compromise, posterior entropy,
  predecessor attack, confidence intervals) as small pure functions;
- :mod:`anomos.lab.report`: every run folded into a table, JSON and CSV;
- :mod:`anomos.lab.plots`: the PNG figures (needs the ``lab`` extra: matplotlib).

docs/research.md defines every figure.
"""
