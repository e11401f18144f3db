"""The training core: model parts and LoRA (model.py), the data (sources.py, datacheck.py, buckets.py,
order.py), the latent and text-embedding cache (cache.py) and the Trainer (loop.py, with its parts), the only
place backward() runs.

Must not: know about storage, clocks, leases or the dashboard; the session wires these parts together.
Importing this package imports nothing heavy; import the submodules.
"""
