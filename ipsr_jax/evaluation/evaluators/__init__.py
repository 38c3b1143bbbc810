"""One evaluator per `config.evals` type; `common.from_config` builds the one an entry names."""
