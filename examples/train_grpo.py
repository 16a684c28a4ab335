"""Train with EfficientGRPOTrainer from a YAML recipe; CLI flags override the recipe.

    accelerate launch --config_file accelerate_configs/cpu_1proc.yaml examples/train_grpo.py \
        --config examples/recipes/default.yaml [--max_steps 20 --output_dir outputs/try]

Every field of `efficient_rlvr.run.RunArguments`, `efficient_rlvr.EfficientGRPOConfig` (all of `trl.GRPOConfig`) and
`trl.ModelConfig` is a flag. `--trainer trl` runs vanilla `trl.GRPOTrainer` on the same recipe.
"""

# efficient_rlvr first: its start-up filter (TRL's known vLLM version notice) must precede TRL's vLLM imports.
from efficient_rlvr import EfficientGRPOConfig  # isort: split

from trl import ModelConfig, TrlParser

from efficient_rlvr.run import RunArguments, train


def main() -> None:
    parser = TrlParser((RunArguments, EfficientGRPOConfig, ModelConfig))
    run_args, training_args, model_args = parser.parse_args_and_config()
    train(run_args, training_args, model_args)


if __name__ == "__main__":
    main()
