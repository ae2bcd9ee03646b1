"""Hypernetworks: LEFT's parameter generator (generator.py) and HyperAdaLoRA's state-update
networks for P, Λ and Q (state_update.py). Both run their MLP parts through the dispatched
``hypernet`` op, so one kernel launch serves every layer."""
