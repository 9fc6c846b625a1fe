"""The timm names of our own architectures (`muse.models` registers them), in a module that imports
nothing: the config accepts these names without loading torch and timm, which a command line then
imports while its cluster starts."""

MODEL_NAMES: tuple[str, ...] = (
    "digits_cnn",
    "digits_cnn_half",
    "lenet5",
    "lenet5_half",
    "cifar_resnet18",
    "cifar_resnet34",
    "wrn16_2",
    "wrn40_2",
)
