"""The public modules of the package: what the API reference and the wheel must cover."""

PUBLIC_MODULES = [
    "higher",
    "higher.optim",
    "higher.patch",
    "higher.batched",
    "higher.checkpoint",
    "higher.implicit",
    "higher.testing",
    "higher.utils",
    "higher.distributed",
    "higher.fsdp",
]
