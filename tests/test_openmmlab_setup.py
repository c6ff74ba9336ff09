"""The set-up builds mmcv with its compiled CPU ops; detection and segmentation need them."""
import pytest
import torch

ops = pytest.importorskip('mmcv.ops', reason='the OpenMMLab stack comes from scripts/setup.sh')


def test_mmcv_nms_suppresses_overlapping_boxes():
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [20., 20., 30., 30.]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    kept, indices = ops.nms(boxes, scores, iou_threshold=0.5)
    assert indices.tolist() == [0, 2]
    assert torch.allclose(kept[:, 4], torch.tensor([0.9, 0.7]))


def test_mmcv_roi_align_matches_torchvision():
    torchvision_ops = pytest.importorskip('torchvision.ops')
    torch.manual_seed(0)
    features = torch.randn(2, 8, 32, 40)
    rois = torch.tensor([[0., 3.5, 4., 20., 17.], [1., 0., 0., 39., 31.], [1., 10.2, 5.7, 12., 9.]])
    ours = ops.RoIAlign((7, 7), spatial_scale=0.5, sampling_ratio=2, aligned=True)(features, rois)
    reference = torchvision_ops.roi_align(features, rois, (7, 7), spatial_scale=0.5, sampling_ratio=2,
                                          aligned=True)
    assert ours.shape == (3, 8, 7, 7)
    assert torch.allclose(ours, reference, atol=1e-5)
