// Keeps every isolated cell's output truthful when the page lost sight of it.
//
// * A page reloaded (or a notebook opened) while a cell runs isolated: the
//   kernel's output for that cell goes to the page that sent it, so this page
//   follows the cell's request on IOPub itself, shows its output in the cell,
//   marks it running, and asks the kernel for a live copy of its panel.
// * A background job (`%%isolate --bg`) still running when the page reloaded: its
//   cell gets the output the kernel kept for it, then follows the rest live (the
//   cell itself is not running, so its prompt stays as it is).
// * A panel whose run ended while nobody watched (the notebook was closed and
//   reopened) is replaced by how it ended, as the kernel remembers it.
// * A panel whose kernel restarted or died says so, instead of freezing.
// * A panel saved mid-run and reopened where no kernel knows it shows a
//   readable note, not "Error displaying widget: model not found".
import type { CodeCell } from '@jupyterlab/cells';
import type { NotebookPanel } from '@jupyterlab/notebook';
import type { KernelMessage } from '@jupyterlab/services';

import type { IJob, IsolateStatus, IWorker } from './status';

type Bundle = { [mime: string]: string };

function note(text: string, color = 'var(--jp-warn-color1, #f57c00)'): Bundle {
  const escaped = text
    .replace(/&/g, '&amp;')
    .replace(/</g, '&lt;')
    .replace(/>/g, '&gt;');
  return {
    'text/plain': `nbisolate: ${text}`,
    'text/html':
      `<div class="nbisolate-panel nbisolate-done" style="border-left: 3px solid ${color}; ` +
      'padding: 1px 8px; font-family: var(--jp-code-font-family, monospace); ' +
      'font-size: var(--jp-code-font-size, 13px); color: var(--jp-ui-font-color2, #616161)">' +
      `■ <b>isolated</b>: ${escaped}</div>`
  };
}

export const KERNEL_LOST = note(
  'the kernel restarted while this cell ran: its worker was stopped with the kernel, ' +
    'and nothing came back. Run the cell again.',
  'var(--jp-error-color1, #d32f2f)'
);

export const UNKNOWN_ENDING = note(
  'this cell was still running when its output was saved, and the kernel has no record ' +
    'of how it ended (it restarted, or it is another kernel). Run the cell again to see.'
);

/** The nbisolate metadata of an output: a live panel or a live copy of one. */
function liveMark(output: any): { display_id?: string; live?: boolean; mirror?: boolean } | null {
  const mark = output?.metadata?.nbisolate;
  return mark && (mark.live || mark.mirror) ? mark : null;
}

function codeCells(panel: NotebookPanel): CodeCell[] {
  return panel.content.widgets.filter(c => c.model.type === 'code') as CodeCell[];
}

function setRunning(cell: CodeCell, running: boolean): void {
  const model = cell.model as any;
  if ('executionState' in model) {
    model.executionState = running ? 'running' : 'idle';
  } else {
    (cell as any).setPrompt(running ? '*' : '');
  }
}

/** Replace outputs of the notebook for which `choose` returns a bundle. */
function replaceOutputs(
  panel: NotebookPanel,
  choose: (output: any) => Bundle | null
): number {
  let replaced = 0;
  for (const cell of codeCells(panel)) {
    const outputs = cell.model.outputs;
    for (let i = 0; i < outputs.length; i++) {
      const bundle = choose(outputs.get(i).toJSON());
      if (bundle) {
        outputs.set(i, { output_type: 'display_data', data: bundle, metadata: {} });
        replaced++;
      }
    }
  }
  return replaced;
}

/** Follows the isolated cells of one notebook that this page did not start. */
export class CellFollower {
  constructor(panel: NotebookPanel, status: IsolateStatus) {
    this._panel = panel;
    this._status = status;
    status.changed.connect(this._onWorkers, this);
    status.known.connect(this._onKnown, this);
    status.kernelLost.connect(this._onKernelLost, this);
    panel.sessionContext.iopubMessage.connect(this._onIOPub, this);
  }

  dispose(): void {
    this._status.changed.disconnect(this._onWorkers, this);
    this._status.known.disconnect(this._onKnown, this);
    this._status.kernelLost.disconnect(this._onKernelLost, this);
    this._panel.sessionContext.iopubMessage.disconnect(this._onIOPub, this);
    this._followed.clear();
  }

  /** Adopt every running cell this page did not send. */
  private _onWorkers(): void {
    const active = new Set(this._status.activeJobs.map(job => job.cell?.msg_id));
    for (const [msgId, followed] of this._followed) {
      if (followed.job && !active.has(msgId)) {
        this._followed.delete(msgId); // the job ended: its last output has arrived
      }
    }
    for (const job of this._status.activeJobs) {
      const msgId = job.cell?.msg_id;
      if (msgId && !this._followed.has(msgId) && !this._status.sentRequest(msgId)) {
        void this._followJob(job);
      }
    }
    for (const worker of this._status.workers) {
      if (worker.job !== null && worker.job !== undefined) {
        continue; // a background job's worker: followed as its job
      }
      const cell = worker.cell;
      if (!cell || !cell.msg_id || this._followed.has(cell.msg_id)) {
        continue;
      }
      if (this._status.sentRequest(cell.msg_id)) {
        continue; // this page's own request: JupyterLab shows its output
      }
      this._follow(worker);
    }
  }

  private _follow(worker: IWorker): void {
    const info = worker.cell!;
    const cell = codeCells(this._panel).find(c => c.model.sharedModel.getId() === info.id);
    if (!cell) {
      return;
    }
    this._followed.set(info.msg_id, {
      cell,
      count: info.count,
      waitClear: false,
      displays: new Map(),
      job: false,
      ready: true
    });
    // A live panel saved before the reload cannot be rebuilt while the cell runs:
    // its live copy comes next, as output of the cell.
    const outputs = cell.model.outputs;
    for (let i = outputs.length - 1; i >= 0; i--) {
      if (liveMark(outputs.get(i).toJSON())) {
        outputs.remove(i);
      }
    }
    setRunning(cell, true);
    this._status.mirror(info.msg_id);
  }

  /** Show what a background job's cell has had so far, then follow its output live. */
  private async _followJob(job: IJob): Promise<void> {
    const info = job.cell!;
    const cell = codeCells(this._panel).find(c => c.model.sharedModel.getId() === info.id);
    if (!cell) {
      return;
    }
    const followed = {
      cell,
      count: info.count,
      waitClear: false,
      displays: new Map<string, number>(),
      job: true,
      ready: false
    };
    this._followed.set(info.msg_id, followed);
    const replayed = await this._status.replay(job.id);
    if (this._followed.get(info.msg_id) !== followed || cell.isDisposed) {
      return;
    }
    const outputs = cell.model.outputs;
    outputs.clear();
    for (const item of replayed) {
      if (item.display_id) {
        followed.displays.set(item.display_id, outputs.length);
      }
      outputs.add(item.output);
    }
    if (info.count !== null) {
      cell.model.executionCount = info.count;
    }
    followed.ready = true;
    this._status.mirror(info.msg_id); // its live panel, as HTML kept up to date
  }

  private _onIOPub(_sender: unknown, msg: KernelMessage.IMessage): void {
    const parent = (msg.parent_header as KernelMessage.IHeader)?.msg_id;
    const followed = parent ? this._followed.get(parent) : undefined;
    if (!followed || followed.cell.isDisposed || !followed.ready) {
      return;
    }
    const outputs = followed.cell.model.outputs;
    const content = msg.content as any;
    const type = msg.header.msg_type;
    const add = (output: any) => {
      if (followed.waitClear) {
        outputs.clear();
        followed.displays.clear();
        followed.waitClear = false;
      }
      const id = content.transient?.display_id;
      if (id) {
        followed.displays.set(id, outputs.length);
      }
      outputs.add(output);
    };
    switch (type) {
      case 'stream':
        add({ output_type: 'stream', name: content.name, text: content.text });
        break;
      case 'display_data':
      case 'execute_result':
      case 'error':
        add({ output_type: type, ...content, transient: undefined });
        break;
      case 'update_display_data': {
        const index = followed.displays.get(content.transient?.display_id);
        if (index !== undefined && index < outputs.length) {
          outputs.set(index, {
            output_type: 'display_data',
            data: content.data,
            metadata: content.metadata ?? {}
          });
        }
        break;
      }
      case 'clear_output':
        if (content.wait) {
          followed.waitClear = true;
        } else {
          outputs.clear();
          followed.displays.clear();
        }
        break;
      case 'status':
        if (content.execution_state === 'idle' && !followed.job) {
          setRunning(followed.cell, false);
          if (followed.count !== null) {
            followed.cell.model.executionCount = followed.count;
          }
          this._followed.delete(parent!);
        }
        break;
      default:
        break;
    }
  }

  /**
   * Now that the kernel's answer is known, settle every live panel the notebook shows
   * that this page did not see: still running, ended (and how), or unknown.
   */
  private async _onKnown(_sender: IsolateStatus, loaded: boolean): Promise<void> {
    const ids: string[] = [];
    for (const cell of codeCells(this._panel)) {
      for (let i = 0; i < cell.model.outputs.length; i++) {
        const mark = liveMark(cell.model.outputs.get(i).toJSON());
        if (mark?.display_id && !this._shown.has(mark.display_id)) {
          ids.push(mark.display_id);
        }
      }
    }
    if (!ids.length) {
      return;
    }
    const found = loaded ? await this._status.lookup(ids) : { live: [], outcomes: {} };
    replaceOutputs(this._panel, output => {
      const mark = liveMark(output);
      const id = mark?.display_id;
      if (!id || !ids.includes(id) || found.live.includes(id)) {
        return null;
      }
      return (found.outcomes as any)[id] ?? UNKNOWN_ENDING;
    });
  }

  private _onKernelLost(): void {
    for (const followed of this._followed.values()) {
      setRunning(followed.cell, false);
    }
    this._followed.clear();
    replaceOutputs(this._panel, output => (liveMark(output) ? KERNEL_LOST : null));
  }

  /** A panel this page saw being displayed: it is this page's own, never stale. */
  noteShown(displayId: string): void {
    this._shown.add(displayId);
  }

  private _panel: NotebookPanel;
  private _status: IsolateStatus;
  private _shown = new Set<string>();
  private _followed = new Map<
    string,
    {
      cell: CodeCell;
      count: number | null;
      waitClear: boolean;
      displays: Map<string, number>;
      /** A background job's cell: followed until the job ends, never marked running. */
      job: boolean;
      /** False until a job's kept output is shown (what arrives before is in it). */
      ready: boolean;
    }
  >();
}
