"""Workflows: whole-run jobs built from the libraries, one layer above them.

Each takes a run folder and combines several libraries: :mod:`.evaluate` (``cnnkit eval``
and ``predict``: a run's model on its test split or on files), :mod:`.compress` and
:mod:`.sweep` (``cnnkit compress``: prune, fine-tune with the trainer, quantise, measure
side by side, timed by :mod:`.latency`), :mod:`.explain` and :mod:`.explain_benchmark`
(``cnnkit explain``: maps of files, every method ranked on the test split), :mod:`.bench`
(``cnnkit bench``: the machine's peak against the trainer and a hand-written loop).
The libraries below (``train``, ``explain``, ``compress``, ``analysis``) never import
each other or this layer; the CLI and the web app sit above.
"""
