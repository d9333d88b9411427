// FastGen DMD Distill: a live loss chart on the node. While the node trains, the server sends each
// iteration's losses over ComfyUI's websocket (event "fastgen.distill.loss", batched a few times a
// second); the chart draws the fake-score loss (orange) and the student's VSD loss (blue), each
// scaled to its own range, with the latest values and the iteration count underneath.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const WIDTH = 320;
const HEIGHT = 120;
const SERIES = [["fake_score", "#f28c26", "fake score"], ["vsd", "#4099f2", "student VSD"]];

class LossChart {
  constructor() {
    this.records = [];
    this.iterations = 0;
    this.root = document.createElement("div");
    this.root.style.cssText = "display:flex;flex-direction:column;gap:2px;width:100%;align-items:center";
    this.canvas = document.createElement("canvas");
    this.canvas.width = WIDTH;
    this.canvas.height = HEIGHT;
    this.canvas.style.cssText = "background:#1b1b1b;border:1px solid #333;max-width:100%";
    this.info = document.createElement("div");
    this.info.style.cssText = "font:11px monospace;color:#ccc;text-align:center;min-height:1.3em";
    this.info.textContent = "losses appear here while the node trains";
    this.root.append(this.canvas, this.info);
  }

  receive(detail) {
    const records = detail.records ?? [];
    // a new run starts again from its first iteration (or a resumed one from where it was)
    if (records.length && this.records.length && records[0].iteration <= this.records.at(-1).iteration) this.records = [];
    this.records.push(...records);
    this.iterations = detail.iterations ?? this.iterations;
    this.draw();
  }

  draw() {
    const ctx = this.canvas.getContext("2d");
    ctx.clearRect(0, 0, WIDTH, HEIGHT);
    const last = this.records.at(-1);
    const parts = [];
    for (const [key, colour, label] of SERIES) {
      const points = this.records.filter((r) => r[key] !== null && r[key] !== undefined && Number.isFinite(r[key]));
      if (!points.length) continue;
      const values = points.map((r) => r[key]);
      const lo = Math.min(...values), hi = Math.max(...values);
      const span = hi - lo || 1;
      const xmax = Math.max(this.iterations, last.iteration, 1);
      ctx.strokeStyle = colour;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      points.forEach((r, i) => {
        const x = 4 + ((WIDTH - 8) * r.iteration) / xmax;
        const y = HEIGHT - 4 - ((HEIGHT - 8) * (r[key] - lo)) / span;
        i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
      });
      ctx.stroke();
      parts.push(`${label} ${values.at(-1).toPrecision(3)}`);
    }
    this.info.textContent = last ? `iteration ${last.iteration} / ${this.iterations} · ${parts.join(" · ")}` : "";
  }
}

app.registerExtension({
  name: "FastGen.DistillLossChart",
  async setup() {
    api.addEventListener("fastgen.distill.loss", (e) => {
      const node = app.graph?.getNodeById(Number(e.detail.node));
      node?.fastgenLossChart?.receive(e.detail);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "FastGenDistillDMD") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onNodeCreated?.apply(this, arguments);
      this.fastgenLossChart = new LossChart();
      const widget = this.addDOMWidget("loss_chart_live", "fastgen_loss_chart", this.fastgenLossChart.root, { serialize: false });
      widget.computeSize = (width) => [width, HEIGHT + 30];
      this.setSize([Math.max(this.size[0], WIDTH + 20), this.computeSize()[1]]);
    };
  },
});
