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


def ksampler(g: Graph, steps: int, x: int) -> int:
    """The stock KSampler as the digit workflows use it: seed 42 fixed, cfg 3, euler, simple."""
    return g.node(
        "KSampler", [42, "fixed", steps, 3.0, "euler", "simple", 1.0],
        inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
        outputs=[("LATENT", "LATENT")], pos=(x, 60), size=(320, 270),
    )


def link_sampler(g: Graph, sampler: int, model: int, cond: int, latent: int):
    """A KSampler-like node fed by the shared front: the model, both conditionings, the latent."""
    g.link(model, 0, sampler, "model")
    g.link(cond, 0, sampler, "positive")
    g.link(cond, 1, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")


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
    sampler = ksampler(g, steps=32, x=420)
    link_sampler(g, sampler, model, cond, latent)
    pixel_decode_and_save(g, sampler, "fastgen/digits", vae_pos=(420, 380), decode_x=800)
    return g


def embedded_fast_solver() -> Graph:
    """The teacher in 8 steps: FastGen Few-Step Sampler (ab2) through SamplerCustomAdvanced."""
    g = Graph()
    model, cond, latent = digit_inputs(g)
    guider = g.node("CFGGuider", [3.0], inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
                    outputs=[("GUIDER", "GUIDER")], pos=(420, 60), size=(280, 100))
    sampler = g.node("FastGenSampler", ["ab2", 0.3], outputs=[("SAMPLER", "SAMPLER")], pos=(420, 200), size=(280, 90))
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


def embedded_student() -> Graph:
    """The 4-step DMD student of the embedded teacher: FastGen Load Student -> Student KSampler, no
    settings (the file's recipe: timesteps 999/750/500/250, cfg 1, multistep_sde). Both nodes are
    drawn tall enough for the text they show after a run (recipe, sigmas used)."""
    g = Graph()
    model = g.node("FastGenLoadStudent", ["embedded/digit_student_4step.safetensors"],
                   outputs=[("MODEL", "MODEL"), ("recipe", "STRING")], pos=(40, 60), size=(360, 220))
    cond = g.node("FastGenDigitConditioning", ["0123456789"],
                  outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING")], pos=(40, 320))
    latent = g.node("EmptyChromaRadianceLatentImage", [32, 32, 10], outputs=[("LATENT", "LATENT")], pos=(40, 480))
    sampler_inputs = [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")]
    sampler = g.node("FastGenStudentSampler", [42, "fixed", 0, 0.0, "recipe", "recipe", 1.0], inputs=sampler_inputs,
                     outputs=[("LATENT", "LATENT")], pos=(440, 60), size=(380, 560))
    link_sampler(g, sampler, model, cond, latent)
    pixel_decode_and_save(g, sampler, "fastgen/digits_4_steps", vae_pos=(860, 560), decode_x=860)
    return g


def distill_dmd_lora() -> Graph:
    """The embedded teacher -> FastGen DMD Distill (2-step LoRA student, 200 iterations) -> the student
    sampled by its recipe -> decode and save; the loss chart is previewed."""
    g = Graph()
    model, cond, latent = digit_inputs(g)
    dmd_inputs = [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")]
    dmd = g.node("FastGenDistillDMD", [2, 200, 1e-3, 16, 3.0, 5, 8, 0, "fixed", "fastgen/digit_dmd_student", False, "", False, 0.0],
                 inputs=dmd_inputs, outputs=[("student", "MODEL"), ("lora", "LORA_MODEL"), ("loss_chart", "IMAGE")], pos=(420, 60),
                 size=(360, 680))
    chart = g.node("PreviewImage", inputs=[("images", "IMAGE")], pos=(1220, 440), size=(400, 240), title="loss chart")
    sampler_inputs = [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")]
    sampler = g.node("FastGenStudentSampler", [42, "fixed", 0, 0.0, "recipe", "recipe", 1.0], inputs=sampler_inputs,
                     outputs=[("LATENT", "LATENT")], pos=(820, 60), size=(360, 500))
    g.link(model, 0, dmd, "model")
    g.link(cond, 0, dmd, "positive")
    g.link(cond, 1, dmd, "negative")
    g.link(latent, 0, dmd, "latent")
    g.link(dmd, 2, chart, "images")
    link_sampler(g, sampler, dmd, cond, latent)
    pixel_decode_and_save(g, sampler, "fastgen/digits_dmd_student", vae_pos=(820, 600), decode_x=1220)
    return g


# The Wan files as ComfyUI's own Wan 2.1 examples name them, and lightx2v's LoRA as it is distributed.
WAN_MODEL = "wan2.1_t2v_14B_fp16.safetensors"
WAN_TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN_VAE = "wan_2.1_vae.safetensors"
LIGHTX2V_LORA = "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors"


def wan_step_distill_lora() -> Graph:
    """Wan 2.1 T2V 14B + lightx2v's step/CFG-distill LoRA -> 4-step video with the Student KSampler.

    The LoRA loader recognises the LoRA and attaches its recipe (4 steps at timesteps 1000/750/500/250,
    shift 5, cfg 1), so the sampler needs no settings and runs no negative pass."""
    g = Graph()
    model = g.node("UNETLoader", [WAN_MODEL, "default"], outputs=[("MODEL", "MODEL")], pos=(40, 60), size=(360, 90))
    clip = g.node("CLIPLoader", [WAN_TEXT_ENCODER, "wan", "default"], outputs=[("CLIP", "CLIP")], pos=(40, 200), size=(360, 110))
    latent = g.node("EmptyHunyuanLatentVideo", [832, 480, 33, 1], outputs=[("LATENT", "LATENT")], pos=(40, 360), size=(360, 130))
    lora = g.node("FastGenLoadStudentLoRA", [LIGHTX2V_LORA, 1.0], inputs=[("model", "MODEL")],
                  outputs=[("MODEL", "MODEL"), ("recipe", "STRING")], pos=(440, 60), size=(380, 240))
    text = g.node("CLIPTextEncode", ["a red fox trotting through fresh snow at sunrise, cinematic, shallow depth of field"],
                  inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")], pos=(440, 340), size=(380, 150))
    sampler_inputs = [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")]
    sampler = g.node("FastGenStudentSampler", [42, "fixed", 0, 0.0, "recipe", "recipe", 1.0], inputs=sampler_inputs,
                     outputs=[("LATENT", "LATENT")], pos=(860, 60), size=(360, 430))
    vae = g.node("VAELoader", [WAN_VAE], outputs=[("VAE", "VAE")], pos=(1260, 60), size=(300, 60))
    decode = g.node("VAEDecode", inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                    pos=(1260, 170), size=(200, 50))
    save = g.node("SaveAnimatedWEBP", ["fastgen/wan_4_steps", 16.0, False, 90, "default"], inputs=[("images", "IMAGE")],
                  pos=(1260, 270), size=(420, 360))
    g.link(model, 0, lora, "model")
    g.link(lora, 0, sampler, "model")
    g.link(clip, 0, text, "clip")
    g.link(text, 0, sampler, "positive")
    g.link(latent, 0, sampler, "latent_image")
    g.link(sampler, 0, decode, "samples")
    g.link(vae, 0, decode, "vae")
    g.link(decode, 0, save, "images")
    return g


SELF_FORCING_MODEL = "self_forcing_dmd.safetensors"


def self_forcing_inputs(g: Graph) -> tuple[int, int, int]:
    """The causal workflows' shared left side: Self-Forcing's student (Wan state dict) with its
    shift-5 schedule, the prompt, an 81-frame 832x480 latent -> (model, positive, latent) node ids."""
    model = g.node("UNETLoader", [SELF_FORCING_MODEL, "default"], outputs=[("MODEL", "MODEL")], pos=(40, 60), size=(360, 90))
    shift = g.node("ModelSamplingSD3", [5.0], inputs=[("model", "MODEL")], outputs=[("MODEL", "MODEL")], pos=(40, 190),
                   size=(360, 60))
    clip = g.node("CLIPLoader", [WAN_TEXT_ENCODER, "wan", "default"], outputs=[("CLIP", "CLIP")], pos=(40, 290), size=(360, 110))
    latent = g.node("EmptyHunyuanLatentVideo", [832, 480, 81, 1], outputs=[("LATENT", "LATENT")], pos=(40, 440), size=(360, 130))
    text = g.node("CLIPTextEncode", ["a red fox trotting through fresh snow at sunrise, cinematic, shallow depth of field"],
                  inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")], pos=(440, 340), size=(380, 150))
    g.link(model, 0, shift, "model")
    g.link(clip, 0, text, "clip")
    return shift, text, latent


def causal_sampler(g: Graph, sources: tuple[int, int, int], compile: bool, cuda_graphs: str = "off", extra_inputs=(),
                   size=(360, 420)) -> int:
    """FastGen Causal Video Sampler fed by `sources` = self_forcing_inputs(g): 7 chunks of 3 latent
    frames (81 video frames), 4 steps each, every earlier frame kept, seed 42."""
    inputs = [("model", "MODEL"), ("positive", "CONDITIONING"), ("latent", "LATENT"), *extra_inputs]
    sampler = g.node("FastGenCausalVideoSampler", [3, 4, 0, 0, 3, 42, "fixed", compile, cuda_graphs], inputs=inputs,
                     outputs=[("LATENT", "LATENT"), ("frames", "IMAGE")], pos=(860, 60), size=size)
    for source, name in zip(sources, ("model", "positive", "latent"), strict=True):
        g.link(source, 0, sampler, name)
    return sampler


def causal_video() -> Graph:
    """A causally trained Wan 2.1 1.3B student (Self-Forcing's DMD checkpoint, saved as a Wan state
    dict) -> ModelSamplingSD3 shift 5 (its schedule) -> FastGen Causal Video Sampler -> VAE Decode
    -> WEBP."""
    g = Graph()
    sampler = causal_sampler(g, self_forcing_inputs(g), compile=False)
    vae = g.node("VAELoader", [WAN_VAE], outputs=[("VAE", "VAE")], pos=(1260, 60), size=(300, 60))
    decode = g.node("VAEDecode", inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                    pos=(1260, 170), size=(200, 50))
    save = g.node("SaveAnimatedWEBP", ["fastgen/causal_video", 16.0, False, 90, "default"], inputs=[("images", "IMAGE")],
                  pos=(1260, 270), size=(420, 360))
    g.link(sampler, 0, decode, "samples")
    g.link(vae, 0, decode, "vae")
    g.link(decode, 0, save, "images")
    return g


def causal_video_fast() -> Graph:
    """The same student at interactive speed: the blocks compiled (torch.compile) and replayed as CUDA
    graphs kept between runs, each chunk's frames streamed by the tiny video decoder (taew2_1 in
    models/vae_approx) straight to the WEBP: 40 FPS and 0.15 s to the first chunk for 81 frames at
    832x480 on an H200 (the benchmark's loop) from the second run on; the first compiles and captures."""
    g = Graph()
    sources = self_forcing_inputs(g)
    tiny = g.node("FastGenLoadTinyVideoDecoder", ["taew2_1.safetensors"], outputs=[("tiny_decoder", "FASTGEN_TINY_DECODER")],
                  pos=(440, 540), size=(380, 60))
    sampler = causal_sampler(g, sources, compile=True, cuda_graphs="kept", extra_inputs=[("tiny_decoder", "FASTGEN_TINY_DECODER")],
                             size=(360, 480))
    save = g.node("SaveAnimatedWEBP", ["fastgen/causal_video_fast", 16.0, False, 90, "default"], inputs=[("images", "IMAGE")],
                  pos=(1260, 60), size=(420, 360))
    g.link(tiny, 0, sampler, "tiny_decoder")
    g.link(sampler, 1, save, "images")
    return g


def world_model_play() -> Graph:
    """The embedded game world model, live: Queue, click the canvas on the node, steer with WASD /
    arrows, Space to jump. The start view (the renderer's first frames) is previewed beside it."""
    g = Graph()
    session = g.node("FastGenWorldSession", ["embedded/game_world_student.safetensors", 1000, 0, 12, 4, 30.0, 2, 120, 0, "fixed"],
                     outputs=[("start_view", "IMAGE")], pos=(40, 60), size=(320, 620))
    preview = g.node("PreviewImage", inputs=[("images", "IMAGE")], pos=(400, 60), size=(260, 300))
    g.link(session, 0, preview, "images")
    return g


def quantize_model() -> Graph:
    """The teacher through FastGen Quantize Model (fp8; calibration inputs linked, off) -> KSampler
    -> pixel decode -> save. The node is drawn tall enough for its report."""
    g = Graph()
    model, cond, latent = digit_inputs(g)
    quant = g.node("FastGenQuantizeModel", ["fp8", "", False, 4, 0],
                   inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("latent", "LATENT")],
                   outputs=[("MODEL", "MODEL"), ("report", "STRING")], pos=(420, 60), size=(380, 360))
    g.link(model, 0, quant, "model")
    g.link(cond, 0, quant, "positive")
    g.link(latent, 0, quant, "latent")
    sampler = ksampler(g, steps=16, x=840)
    link_sampler(g, sampler, quant, cond, latent)
    pixel_decode_and_save(g, sampler, "fastgen/digits_fp8", vae_pos=(840, 380), decode_x=1200)
    return g


def embedded_teacher_cache() -> Graph:
    """The teacher at 32 steps behind FastGen Cache (step policy, threshold 0.05): about 20 of the 32
    model calls skipped, ~43 dB PSNR against the uncached images (see benchmarks/RESULTS.md)."""
    g = Graph()
    model, cond, latent = digit_inputs(g)
    cached = g.node("FastGenCache", ["step", 0.05, 0.0, 1.0, 4, 2, 1], inputs=[("model", "MODEL")],
                    outputs=[("MODEL", "MODEL")], pos=(420, 60), size=(300, 250))
    g.link(model, 0, cached, "model")
    sampler = ksampler(g, steps=32, x=760)
    link_sampler(g, sampler, cached, cond, latent)
    pixel_decode_and_save(g, sampler, "fastgen/digits_cached", vae_pos=(760, 380), decode_x=1120)
    return g


WORKFLOW_BUILDERS = {
    "embedded_teacher.json": embedded_teacher,
    "embedded_fast_solver.json": embedded_fast_solver,
    "embedded_student.json": embedded_student,
    "distill_dmd_lora.json": distill_dmd_lora,
    "wan_step_distill_lora.json": wan_step_distill_lora,
    "causal_video.json": causal_video,
    "causal_video_fast.json": causal_video_fast,
    "world_model_play.json": world_model_play,
    "quantize_model.json": quantize_model,
    "embedded_teacher_cache.json": embedded_teacher_cache,
}

if __name__ == "__main__":
    for name, build in WORKFLOW_BUILDERS.items():
        path = os.path.join(WORKFLOWS, name)
        with open(path, "w") as f:
            json.dump(build().to_json(), f, indent=1)
            f.write("\n")
        print("wrote", path)
