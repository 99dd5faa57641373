"""Dense-prediction models from torchvision, built the way users build them (random weights, nothing
downloaded): segmentation models return an OrderedDict {"out": ..., "aux": ...}; the detection FPN
backbone uses FrozenBatchNorm2d and returns an OrderedDict of feature maps {"0", "1", "2", "3", "pool"}.

    gpdc compile tests/user_models/torchvision_dense.py --entry resnet_fpn_backbone_r18 --spec ...

Inputs: 64×64 is enough for all four (the segmentation outputs are upsampled to the input size).
"""

from torchvision.models import segmentation
from torchvision.models.detection import backbone_utils

NUM_CLASSES = 5


def fcn_resnet50():
    """FCN-ResNet50 (dilated, output stride 8) with the auxiliary head: {"out": [N,5,H,W], "aux": [N,5,H,W]}."""
    return segmentation.fcn_resnet50(weights=None, weights_backbone=None, aux_loss=True, num_classes=NUM_CLASSES)


def deeplabv3_mobilenet_v3_large():
    """DeepLabV3 (ASPP with image pooling: BatchNorm after global pooling) on MobileNetV3-Large, with the
    auxiliary head: {"out", "aux"}."""
    return segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, aux_loss=True,
                                                     num_classes=NUM_CLASSES)


def lraspp_mobilenet_v3_large():
    """LR-ASPP on MobileNetV3-Large: {"out": [N,5,H,W]} (a sigmoid gate from globally pooled features)."""
    return segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)


def resnet_fpn_backbone_r18():
    """ResNet-18 + FPN (FrozenBatchNorm2d, conv1/layer1 frozen): OrderedDict of five 256-channel maps
    {"0": stride 4, "1": 8, "2": 16, "3": 32, "pool": 64}."""
    return backbone_utils.resnet_fpn_backbone(backbone_name="resnet18", weights=None)
