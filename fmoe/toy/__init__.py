"""The toy domain-specialist MoE (model.py), the seeded corpus it learned (corpus.py), and tiny random models of
every supported family for tests (tiny.py)."""

from .model import (TOY_DIR, TRAIN_CONFIG, ToyConfig, batches, collate, corpus_files, encode, evaluate_accuracy,
                    interleaved, load, read_jsonl, toy_tasks_dir, train)

__all__ = ["TOY_DIR", "TRAIN_CONFIG", "ToyConfig", "batches", "collate", "corpus_files", "encode", "evaluate_accuracy",
           "interleaved", "load", "read_jsonl", "toy_tasks_dir", "train"]
