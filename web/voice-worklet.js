// The Voice page's capture processor (an AudioWorklet, loaded from /ui/static/): batches the
// microphone's samples (mono: the first channel) into ~40 ms blocks and posts each to the
// page, which does the level-based voice activity detection and keeps what it records.

class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.size = Math.max(128, Math.round(sampleRate * 0.04));
    this.buf = new Float32Array(this.size);
    this.used = 0;
  }

  process(inputs, outputs) {
    const input = inputs[0] && inputs[0][0];
    if (input) {
      let i = 0;
      while (i < input.length) {
        const n = Math.min(input.length - i, this.size - this.used);
        this.buf.set(input.subarray(i, i + n), this.used);
        this.used += n;
        i += n;
        if (this.used === this.size) {
          this.port.postMessage(this.buf, [this.buf.buffer]);
          this.buf = new Float32Array(this.size);
          this.used = 0;
        }
      }
    }
    for (const out of outputs) for (const ch of out) ch.fill(0); // silent: nothing echoes
    return true;
  }
}

registerProcessor("macmesh-capture", Capture);
