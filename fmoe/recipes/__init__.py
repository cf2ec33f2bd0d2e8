"""The recipes behind the `fmoe` command and the scripts in recipes/: prune_recover, train_toy_moe."""
