"""The MoE inside a Hugging Face model, and the files fmoe writes.

compat.py holds every transformers-version quirk and the family table; experts.py the expert layouts (stock fused
modules, RaggedExperts width buckets) and their forward; hooks.py fmoe's experts implementation, which lets
calibration and masks see each expert's intermediate activation; structure.py the edited structures a config
records (expert widths, expert counts, dropped MoE sublayers, compressed experts) and their rebuild;
checkpoint.py save_pretrained / from_pretrained.
"""
