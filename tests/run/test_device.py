"""Which CUDA device a learner rank drives, from the GPU ids Ray gave it and the devices it sees."""

import pytest

from anyflow_ray.run.device import cuda_index


@pytest.mark.parametrize("gpu_ids, visible, index", [
    (["3"], "3", 0),            # Ray's default: only the assigned GPU is visible, as device 0
    (["3"], None, 3),           # learner.see_node_gpus: the node's GPUs, selected by id
    (["5"], "4,5,6,7", 1),      # a node that lists its GPUs itself (a container's share of a host)
    (["1", "2"], "0,1,2,3", 1),  # the first of several
])
def test_a_rank_selects_the_gpu_ray_assigned_among_those_it_sees(gpu_ids, visible, index):
    assert cuda_index(gpu_ids, visible) == index


def test_a_process_without_a_gpu_or_that_cannot_see_its_gpu_has_no_cuda_index():
    with pytest.raises(ValueError, match="no GPU was assigned"):
        cuda_index([], None)
    for visible in ("0,1", ""):  # never another rank's GPU in its place
        with pytest.raises(ValueError, match=f"GPU 3 was assigned to this process but CUDA_VISIBLE_DEVICES={visible!r}"):
            cuda_index(["3"], visible)
