// Shows what a FastGen node reports after it runs (the recipe a loader found, the sigmas the
// Student KSampler used, warnings) in a read-only text box on the node, the way ComfyUI's own
// Preview Any shows its value. The box is not saved with the workflow.
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

const NODES_WITH_INFO = ["FastGenLoadStudent", "FastGenLoadStudentLoRA", "FastGenStudentSampler", "FastGenDistillDMD"];

app.registerExtension({
  name: "FastGen.NodeInfo",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES_WITH_INFO.includes(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, [message]);
      const text = (message?.text ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === "fastgen_info");
      if (!widget) {
        widget = ComfyWidgets["STRING"](this, "fastgen_info", ["STRING", { multiline: true }], app).widget;
        widget.element.readOnly = true;
        widget.serialize = false;
        // room for a few lines of text below the inputs (a multiline box gets no height by itself);
        // a node the workflow already made tall enough keeps its size
        const needed = this.computeSize()[1] + 80;
        this.setSize([Math.max(this.size[0], 360), Math.max(this.size[1], needed)]);
        this.onResize?.(this.size); // lays the new box out even when the size did not change
      }
      widget.value = text;
      app.graph.setDirtyCanvas(true, false);
    };
  },
});
