"""Annotators over controlnet-aux: offline ones run, weight-based ones load from a folder or explain."""

import numpy as np
import pytest
import torch

from cnkit.data import toyworld
from cnkit.generation import annotators


def test_offline_annotators_make_maps_at_the_source_size():
    s = toyworld.sample("shapes", 1)
    for name in ("canny", "lineart_standard", "content_shuffle"):
        out = annotators.annotate(name, s.image)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and out.any(), name
    assert (annotators.annotate("canny", s.image) == toyworld.canny(s.image)).all()


def test_content_shuffle_is_seeded_and_leaves_numpy_alone():
    image = toyworld.sample("shapes", 2).image
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    a = annotators.annotate("content_shuffle", image, seed=5)
    assert np.random.rand() == expected_next  # the global generator's state was restored
    assert (annotators.annotate("content_shuffle", image, seed=5) == a).all()
    assert not (annotators.annotate("content_shuffle", image, seed=6) == a).all()


def test_toy_annotators_return_the_exact_maps_and_refuse_plain_images():
    s = toyworld.sample("shapes", 4)
    for kind in ("outline", "segmentation", "depth", "edges"):
        assert (annotators.annotate(f"toy_{kind}", s) == s.conditions[kind]).all()
    with pytest.raises(annotators.AnnotatorError, match="toy-world scene.s exact geometry, not an image"):
        annotators.annotate("toy_depth", s.image)
    with pytest.raises(annotators.AnnotatorError, match="has no 'segmentation' map"):
        annotators.annotate("toy_segmentation", toyworld.sample("fill", 0))


def test_bad_input_names_the_problem():
    image = toyworld.sample("fill", 0).image
    with pytest.raises(annotators.AnnotatorError, match="unknown annotator 'sobel'"):
        annotators.annotate("sobel", image)
    with pytest.raises(annotators.AnnotatorError, match="no setting.*sigma.*accepts: low_threshold"):
        annotators.annotate("canny", image, sigma=2)
    with pytest.raises(annotators.AnnotatorError, match="uint8"):
        annotators.annotate("canny", image.astype(np.float32))
    with pytest.raises(annotators.AnnotatorError, match="HxWx3"):
        annotators.annotate("canny", image[None])


def test_weight_based_annotator_offline_without_files_says_which_files_and_how(tmp_path):
    with pytest.raises(annotators.AnnotatorError, match=r"ControlNetHED\.pth.*huggingface-cli download"):
        annotators.annotate("hed", toyworld.sample("fill", 0).image)
    with pytest.raises(annotators.AnnotatorError, match=r"body_pose_model\.pth.*folder"):
        annotators.annotate("openpose", toyworld.sample("fill", 0).image, weights=str(tmp_path))


def test_weight_based_annotator_loads_from_a_local_folder(tmp_path):
    """HED from a folder holding ControlNetHED.pth (random weights here: the loading path is what is tested;
    torch.load runs with weights_only, so no pickle from the folder is executed)."""
    from controlnet_aux.hed import ControlNetHED_Apache2

    torch.manual_seed(0)
    torch.save(ControlNetHED_Apache2().state_dict(), tmp_path / "ControlNetHED.pth")
    annotators.detector.cache_clear()
    out = annotators.annotate("hed", toyworld.sample("shapes", 1).image, weights=str(tmp_path))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_small_grey_transparent_and_odd_shaped_sources_are_annotated_at_their_own_size():
    """controlnet-aux works at a multiple of 64 px: smaller sources (a 1x1, a 32x32) are detected at 64 and the map
    returned at the source's size; grey and transparent sources are made RGB first (cnkit.pixels.to_rgb)."""
    for source in (np.zeros((1, 1, 3), np.uint8), np.full((32, 32), 200, np.uint8), np.zeros((32, 48, 4), np.uint8),
                   np.zeros((10, 300, 3), np.uint8)):
        out = annotators.annotate("canny", source)
        assert out.shape == (*source.shape[:2], 3) and out.dtype == np.uint8
