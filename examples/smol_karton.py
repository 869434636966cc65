"""Karton's "Extending configuration" example, ported to asynckarton: unchanged but for the
import, ``async def process`` and the colon the original's ``if`` was missing.

From the ``examples`` folder, run ``asynckarton system`` in one shell and
``python smol_karton.py --how-smol 5`` in another (or both in one process:
``asynckarton run smol_karton.py:SmolKarton --with-system --how-smol 5``), then feed it::

    python send_task.py '{"type": "smol-tasks", "size": 3}'
"""

import argparse

from asynckarton import Config, Karton, Task


class SmolKarton(Karton):
    identity = "karton.smol"
    filters = [{"type": "smol-tasks"}]

    async def process(self, task: Task) -> None:
        if self.config.has_option("smol", "how_smol"):
            how_smol = self.config.getint("smol", "how_smol")
            if task.headers["size"] > how_smol:
                # Task is not smol enough UwU
                return
        ...  # noqa: PIE790

    @classmethod
    def args_parser(cls) -> argparse.ArgumentParser:
        # Remember to call super method to include base arguments
        parser = super().args_parser()
        parser.add_argument(
            "--how-smol",
            type=int,
            default=cls.GC_INTERVAL,
            help="Sets size limit for tasks",
        )
        return parser

    @classmethod
    def config_from_args(cls, config: Config, args: argparse.Namespace) -> None:
        # Remember to call super method to include base arguments
        super().config_from_args(config, args)
        config.load_from_dict(
            {
                "smol": {
                    "how_smol": args.how_smol,
                }
            }
        )


if __name__ == "__main__":
    SmolKarton.main()
