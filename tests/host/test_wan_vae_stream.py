"""Streaming decode (#7) against the host's own Wan 2.1 VAE code, in this process (no server)."""


import pytest
import torch
from comfy_host import import_host_in_process, load_repo_module


@pytest.fixture(scope="module")
def wan_vae_module():
    def vae():
        from comfy.ldm.wan.vae import WanVAE

        return WanVAE

    WanVAE = import_host_in_process(vae)
    module = load_repo_module("wan_vae_stream", "nodes", "host", "wan_vae_stream.py")
    return WanVAE, module


def test_chunked_decode_equals_one_decode_of_the_whole_latent(wan_vae_module):
    WanVAE, stream = wan_vae_module
    torch.manual_seed(0)
    vae = WanVAE(dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[True]).eval()
    with torch.no_grad():  # the host's layers skip weight init (it always loads weights)
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    z = torch.randn(1, 4, 7, 4, 4)
    with torch.no_grad():
        whole = vae.decode(z)
    decoder = stream.WanStreamingDecoder(vae)
    parts = [decoder(z[:, :, i:i + 3]) for i in range(0, 7, 3)]  # chunks of 3, 3, 1 latent frames
    assert [p.shape[2] for p in parts] == [1 + 2 * 2, 3 * 2, 2]  # temporal upsampling x2 here: first frame gives 1
    assert torch.isfinite(whole).all()
    # float32 convolutions over other frame counts may sum in another order on another CPU
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=1e-5, atol=1e-5)
    fresh = stream.WanStreamingDecoder(vae)
    assert not torch.equal(fresh(z[:, :, 3:6]), parts[1]), "the cache carried nothing between chunks"
