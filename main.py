"""Run lightning-unlearn from a checkout: ``python main.py fit --model NPO ...``, or any other subcommand."""

from lightning_unlearn.commands import main

if __name__ == "__main__":
    main()
