"""tiramisu-brats: brain tumor segmentation in multi-modal MRI with a 2D FC-DenseNet."""

__version__ = "0.1.0"
