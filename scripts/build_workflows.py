"""Write the shared workflows in workflows/ (ComfyUI's UI format, what users drag in).

Each workflow is described here as nodes with widget values and links; the script lays them out
left to right and writes the JSON the frontend saves. Run it after changing a workflow:

    python scripts/build_workflows.py
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
WORKFLOWS = os.path.join(os.path.dirname(HERE), "workflows")


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, type_, widgets=(), inputs=(), outputs=(), pos=(0, 0), size=(320, 130), title=None):
        """inputs: [(name, TYPE)], outputs: [(name, TYPE)]; returns the node id."""
        node_id = len(self.nodes) + 1
        node = {
            "id": node_id, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": node_id - 1,
            "mode": 0, "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node_id

    def link(self, src, src_slot, dst, dst_input):
        link_id = len(self.links) + 1
        src_node, dst_node = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, inp in enumerate(dst_node["inputs"]) if inp["name"] == dst_input)
        type_ = src_node["outputs"][src_slot]["type"]
        src_node["outputs"][src_slot]["links"].append(link_id)
        dst_node["inputs"][slot]["link"] = link_id
        self.links.append([link_id, src, src_slot, dst, slot, type_])

    def to_json(self):
        return {
            "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
            "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
            "version": 0.4,
        }


def digit_inputs(g: Graph):
    """The front every embedded-image workflow shares: the teacher, the digits, a 32x32 latent batch of 10."""
    model = g.node("FastGenLoadModel", ["embedded/digit_teacher.safetensors"], outputs=[("MODEL", "MODEL")], pos=(40, 60))
    cond = g.node("FastGenDigitConditioning", ["0123456789"],
                  outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING")], pos=(40, 220))
    latent = g.node("EmptyChromaRadianceLatentImage", [32, 32, 10], outputs=[("LATENT", "LATENT")], pos=(40, 380))
    return model, cond, latent


def pixel_decode_and_save(g: Graph, samples_node: int, prefix: str, vae_pos, decode_x: int):
    """The back they share: the host's pixel-space VAE, VAE Decode, Save Image."""
    vae = g.node("VAELoader", ["pixel_space"], outputs=[("VAE", "VAE")], pos=vae_pos)
    decode = g.node("VAEDecode", inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                    pos=(decode_x, 60), size=(200, 50))
    save = g.node("SaveImage", [prefix], inputs=[("images", "IMAGE")], pos=(decode_x, 160), size=(400, 300))
    g.link(samples_node, 0, decode, "samples")
    g.link(vae, 0, decode, "vae")
    g.link(decode, 0, save, "images")


def embedded_teacher() -> Graph:
    """Load the embedded digit teacher -> condition on digits -> KSampler -> pixel decode -> save."""
    g = Graph()
    model, cond, latent = digit_inputs(g)
    sampler = g.node(
        "KSampler", [42, "fixed", 32, 3.0, "euler", "simple", 1.0],
        inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
        outputs=[("LATENT", "LATENT")], pos=(420, 60), size=(320, 270),
    )
    g.link(model, 0, sampler, "model")
    g.link(cond, 0, sampler, "positive")
    g.link(cond, 1, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    pixel_decode_and_save(g, sampler, "fastgen/digits", vae_pos=(420, 380), decode_x=800)
    return g


def embedded_fast_solver() -> Graph:
    """The teacher in 8 steps: FastGen Few-Step Sampler (dpmpp_2m) through SamplerCustomAdvanced."""
    g = Graph()
    model, cond, latent = digit_inputs(g)
    guider = g.node("CFGGuider", [3.0], inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
                    outputs=[("GUIDER", "GUIDER")], pos=(420, 60), size=(280, 100))
    sampler = g.node("FastGenSampler", ["dpmpp_2m", 0.3], outputs=[("SAMPLER", "SAMPLER")], pos=(420, 200), size=(280, 90))
    sigmas = g.node("BasicScheduler", ["simple", 8, 1.0], inputs=[("model", "MODEL")], outputs=[("SIGMAS", "SIGMAS")],
                    pos=(420, 330), size=(280, 110))
    noise = g.node("RandomNoise", [42, "fixed"], outputs=[("NOISE", "NOISE")], pos=(420, 480), size=(280, 80))
    run_inputs = [("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"), ("latent_image", "LATENT")]
    run = g.node("SamplerCustomAdvanced", inputs=run_inputs,
                 outputs=[("output", "LATENT"), ("denoised_output", "LATENT")], pos=(740, 60), size=(260, 140))
    g.link(model, 0, guider, "model")
    g.link(cond, 0, guider, "positive")
    g.link(cond, 1, guider, "negative")
    g.link(model, 0, sigmas, "model")
    for src, name in ((noise, "noise"), (guider, "guider"), (sampler, "sampler"), (sigmas, "sigmas"), (latent, "latent_image")):
        g.link(src, 0, run, name)
    pixel_decode_and_save(g, run, "fastgen/digits_8_steps", vae_pos=(740, 260), decode_x=1040)
    return g


WORKFLOW_BUILDERS = {"embedded_teacher.json": embedded_teacher, "embedded_fast_solver.json": embedded_fast_solver}

if __name__ == "__main__":
    for name, build in WORKFLOW_BUILDERS.items():
        path = os.path.join(WORKFLOWS, name)
        with open(path, "w") as f:
            json.dump(build().to_json(), f, indent=1)
            f.write("\n")
        print("wrote", path)
