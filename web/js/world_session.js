// FastGen World Session: a live canvas on the node. Frames of the running world model arrive over
// ComfyUI's websocket (event "fastgen.world.frames", a chunk at a time) and are played at the
// session's frame rate; while the canvas has focus, WASD / arrow keys steer and Space jumps
// (POST /fastgen/world/action). Start queues the graph (which starts a new session), Reset returns
// to the first view, Stop ends the session.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const KEYS = {
  ArrowUp: "up", KeyW: "up", ArrowDown: "down", KeyS: "down",
  ArrowLeft: "left", KeyA: "left", ArrowRight: "right", KeyD: "right", Space: "jump",
};
const SCALE = 4; // 64x64 frames drawn at 256x256, pixelated
const HISTORY = 64; // frames kept for inspection (tests read them)

function post(path, body) {
  return api.fetchApi(path, { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } });
}

class WorldCanvas {
  constructor(node) {
    this.node = node;
    this.session = null;
    this.queue = [];
    this.history = [];
    this.framesDrawn = 0;
    this.drawTimes = [];
    this.held = [];
    this.maxFps = 30;
    this.status = "Queue the graph (or press Start), then click here and use WASD / arrows, Space to jump.";

    this.root = document.createElement("div");
    this.root.style.cssText = "display:flex;flex-direction:column;gap:4px;align-items:center;width:100%";
    this.canvas = document.createElement("canvas");
    this.canvas.width = this.canvas.height = 64 * SCALE;
    this.canvas.tabIndex = 0;
    this.canvas.title = "Click, then steer with WASD / arrow keys; Space jumps";
    this.canvas.style.cssText = "image-rendering:pixelated;background:#111;outline:none;border:2px solid #333;max-width:100%";
    this.ctx = this.canvas.getContext("2d");
    this.ctx.imageSmoothingEnabled = false;
    this.info = document.createElement("div");
    this.info.style.cssText = "font:11px monospace;color:#ccc;text-align:center;min-height:3.9em;line-height:1.3em";
    const buttons = document.createElement("div");
    buttons.style.cssText = "display:flex;gap:6px";
    for (const [label, action] of [["Start", () => this.start()], ["Reset", () => this.send("reset")], ["Stop", () => this.send("stop")]]) {
      const button = document.createElement("button");
      button.textContent = label;
      button.className = "fastgen-world-" + label.toLowerCase();
      button.onclick = action;
      buttons.appendChild(button);
    }
    this.root.append(this.canvas, this.info, buttons);

    this.canvas.addEventListener("focus", () => (this.canvas.style.borderColor = "#4a9"));
    this.canvas.addEventListener("blur", () => { this.canvas.style.borderColor = "#333"; this.release(); });
    this.canvas.addEventListener("keydown", (e) => this.key(e, true));
    this.canvas.addEventListener("keyup", (e) => this.key(e, false));
    this.canvas.addEventListener("pointerdown", () => this.canvas.focus());
    this.render = this.render.bind(this);
    requestAnimationFrame(this.render);
    this.showInfo();
  }

  key(event, down) {
    const action = KEYS[event.code];
    if (!action) return;
    event.preventDefault();
    event.stopPropagation(); // the graph editor's own shortcuts must not see steering keys
    if (action === "jump") {
      if (down && !event.repeat) this.act("jump");
      return;
    }
    if (down) {
      if (event.repeat && this.held.at(-1) === action) return;
      this.held = this.held.filter((a) => a !== action).concat(action);
    } else {
      this.held = this.held.filter((a) => a !== action);
    }
    this.act(this.held.at(-1) ?? "none"); // the latest key still held wins
  }

  release() {
    if (this.held.length) {
      this.held = [];
      this.act("none");
    }
  }

  async act(action) {
    if (!this.session) return;
    const response = await post("/fastgen/world/action", { session: this.session, action });
    if (!response.ok) this.problem(response);
  }

  async send(what) {
    if (!this.session) return;
    const response = await post(`/fastgen/world/${what}`, { session: this.session });
    if (!response.ok) this.problem(response);
  }

  async problem(response) {
    let message = `${response.status}`;
    try { message = (await response.json()).error ?? message; } catch {}
    this.status = message;
    this.showInfo();
  }

  start() {
    this.status = "starting…";
    this.showInfo();
    app.queuePrompt(0, 1);
  }

  started(info) {
    this.session = info.session;
    this.maxFps = info.max_fps ?? 30;
    this.queue = [];
    this.status = `${info.model}: ${info.steps} steps per chunk of ${info.chunk_frames} frames`;
    this.showInfo();
    this.canvas.focus();
  }

  receive(detail) {
    if (detail.session !== this.session) return; // an older session's last frames
    for (const [i, png] of detail.frames.entries()) this.queue.push({ index: detail.first + i, png });
    if (this.queue.length > 4 * detail.frames.length) this.queue.splice(0, this.queue.length - detail.frames.length);
    this.remote = detail.status;
  }

  stopped(detail) {
    if (detail.session !== this.session) return;
    this.session = null;
    this.status = `stopped: ${detail.status?.stopped ?? ""}${detail.status?.error ? " — " + detail.status.error : ""}`;
    this.showInfo();
  }

  render(now) {
    requestAnimationFrame(this.render);
    if (!this.queue.length || (this.lastDraw && now - this.lastDraw < 1000 / this.maxFps - 2)) return;
    const frame = this.queue.shift();
    this.lastDraw = now;
    const image = new Image();
    image.onload = () => this.ctx.drawImage(image, 0, 0, this.canvas.width, this.canvas.height);
    image.src = "data:image/png;base64," + frame.png;
    this.history.push(frame);
    if (this.history.length > HISTORY) this.history.shift();
    this.framesDrawn += 1;
    this.drawTimes.push(now);
    while (this.drawTimes.length && now - this.drawTimes[0] > 1000) this.drawTimes.shift();
    this.showInfo();
  }

  get fps() {
    return this.drawTimes.length;
  }

  showInfo() {
    const r = this.remote;
    const live = r ? `${this.fps} FPS shown · model ${r.generation_fps} FPS · frame ${this.history.at(-1)?.index ?? 0} · ${r.action}` : "";
    this.info.textContent = `${live}\n${this.status}`;
    this.info.style.whiteSpace = "pre-line";
  }
}

app.registerExtension({
  name: "FastGen.WorldSession",
  async setup() {
    const forNode = (detail) => app.graph?.getNodeById(Number(detail.node))?.fastgenWorld;
    api.addEventListener("fastgen.world.frames", (e) => forNode(e.detail)?.receive(e.detail));
    api.addEventListener("fastgen.world.stopped", (e) => forNode(e.detail)?.stopped(e.detail));
    // the session token comes to this page alone (not in the node's output, which the history shares)
    api.addEventListener("fastgen.world.started", (e) => forNode(e.detail)?.started(e.detail));
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "FastGenWorldSession") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onNodeCreated?.apply(this, arguments);
      this.fastgenWorld = new WorldCanvas(this);
      const widget = this.addDOMWidget("world_canvas", "fastgen_world", this.fastgenWorld.root, { serialize: false });
      widget.computeSize = (width) => [width, 64 * SCALE + 120];
      this.setSize([Math.max(this.size[0], 64 * SCALE + 40), this.computeSize()[1]]);
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.fastgenWorld?.send("stop");
      onRemoved?.apply(this, arguments);
    };
  },
});
