"""Dense prediction under token reduction: the Fashion-MNIST mosaic benchmark, the linear-decoder
segmenter, segmentation metrics and evaluation."""
