"""Run lightning-unlearn from a checkout: ``python main.py fit --model NPO ...``."""

from lightning_unlearn.cli import main

if __name__ == "__main__":
    main()
