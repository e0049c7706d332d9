// Status-bar item: the current notebook kernel's isolated workers, and a popup
// listing each one with a Stop button.
import type { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { Popup, showPopup } from '@jupyterlab/statusbar';
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import {
  elapsed,
  formatDuration,
  formatLimit,
  IJob,
  IsolateStatus,
  IWorker
} from './status';

const TICK_MS = 250;

/** Shows the cell that runs a worker (scrolls to it and selects it). */
export type RevealCell = (status: IsolateStatus, worker: IWorker) => void;

/** `[13] first line of the cell`, as the notebook shows the cell. */
export function workerTitle(worker: IWorker): string {
  const count = worker.cell?.count;
  const label = worker.label || worker.id;
  return count === null || count === undefined ? label : `[${count}] ${label}`;
}

/** `[13] first line of the cell` of a background job. */
export function jobTitle(job: IJob): string {
  const count = job.cell?.count;
  return count === null || count === undefined ? job.label : `[${count}] ${job.label}`;
}

/** A Stop button that looks like the one in the cell's panel (an ipywidgets Button). */
export function stopButton(title: string, onClick: () => void): HTMLButtonElement {
  const button = document.createElement('button');
  button.className =
    'jupyter-widgets jupyter-button widget-button nbisolate-stop';
  const icon = document.createElement('i');
  icon.className = 'fa fa-stop';
  button.append(icon, 'Stop');
  button.title = title;
  button.addEventListener('click', event => {
    event.stopPropagation();
    button.disabled = true;
    button.replaceChildren(icon, 'Stopping…');
    onClick();
  });
  return button;
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

export class IsolateStatusItem extends Widget {
  constructor(
    tracker: INotebookTracker,
    statusFor: (panel: NotebookPanel) => IsolateStatus,
    reveal: RevealCell
  ) {
    super({ node: document.createElement('div') });
    this.addClass('nbisolate-status');
    this.addClass('jp-mod-highlighted');
    this.node.title = 'Isolated workers of this notebook’s kernel';
    this._text = document.createElement('span');
    this._text.className = 'jp-StatusBar-TextItem nbisolate-status-text';
    this.node.appendChild(this._text);
    this.node.addEventListener('click', () => this.openPopup());
    this._tracker = tracker;
    this._statusFor = statusFor;
    this._reveal = reveal;
    tracker.currentChanged.connect(this._onCurrentChanged, this);
    this._onCurrentChanged();
  }

  /** Whether there is anything to show (nbisolate loaded in the kernel). */
  get hasContent(): boolean {
    return this._status?.available ?? false;
  }

  get contentChanged(): ISignal<this, void> {
    return this._contentChanged;
  }

  get status(): IsolateStatus | null {
    return this._status;
  }

  openPopup(): void {
    const status = this._status;
    if (!status) {
      return;
    }
    this._popup?.dispose();
    status.refresh();
    const body = new WorkerList(status, (st, worker) => {
      this._popup?.dispose();
      this._reveal(st, worker);
    });
    const popup = showPopup({ body, anchor: this, align: 'left' });
    this._popup = popup;
    // Esc closes it, wherever the focus is.
    const onKey = (event: KeyboardEvent) => {
      if (event.key === 'Escape') {
        event.preventDefault();
        event.stopPropagation();
        popup.dispose();
      }
    };
    document.addEventListener('keydown', onKey, true);
    popup.disposed.connect(() => {
      document.removeEventListener('keydown', onKey, true);
      body.dispose();
      if (this._popup === popup) {
        this._popup = null;
      }
    });
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    window.clearInterval(this._timer);
    this._popup?.dispose();
    Signal.clearData(this);
    super.dispose();
  }

  private _onCurrentChanged(): void {
    const panel = this._tracker.currentWidget;
    const status = panel ? this._statusFor(panel) : null;
    if (status === this._status) {
      return;
    }
    this._status?.changed.disconnect(this._render, this);
    this._status = status;
    status?.changed.connect(this._render, this);
    this._popup?.dispose();
    this._render();
  }

  private _render(): void {
    const status = this._status;
    const had = this._hadContent;
    this._hadContent = this.hasContent;
    const workers = status?.foreground ?? [];
    const jobs = status?.activeJobs ?? [];
    this.node.dataset.count = String(workers.length);
    this.node.dataset.jobs = String(jobs.length);
    this.node.classList.toggle('nbisolate-mod-running', workers.length > 0);
    this.node.classList.toggle('nbisolate-mod-background', jobs.length > 0);
    const background = jobs.length > 0 ? ` · ${jobs.length} in background` : '';
    if (!status || !status.available) {
      this._text.textContent = '';
    } else if (workers.length === 0) {
      this._text.textContent = jobs.length > 0 ? `isolate:${background.slice(2)}` : 'isolate: idle';
    } else {
      const longest = Math.max(...workers.map(w => elapsed(w)));
      this._text.textContent =
        `isolate: ${workers.length} running · ${formatDuration(longest)}${background}`;
    }
    if (workers.length > 0 && this._timer === 0) {
      this._timer = window.setInterval(() => this._render(), TICK_MS);
    } else if (workers.length === 0 && this._timer !== 0) {
      window.clearInterval(this._timer);
      this._timer = 0;
    }
    if (had !== this._hadContent) {
      this._contentChanged.emit();
    }
  }

  private _tracker: INotebookTracker;
  private _reveal: RevealCell;
  private _statusFor: (panel: NotebookPanel) => IsolateStatus;
  private _status: IsolateStatus | null = null;
  private _text: HTMLSpanElement;
  private _timer = 0;
  private _hadContent = false;
  private _popup: Popup | null = null;
  private _contentChanged = new Signal<this, void>(this);
}

/** The list of workers (the popup's body, Notebook 7's dialog): one row per worker. */
export class WorkerList extends Widget {
  constructor(status: IsolateStatus, reveal: RevealCell) {
    super();
    this.addClass('nbisolate-popup');
    this._status = status;
    this._reveal = reveal;
    status.changed.connect(this._render, this);
    this._timer = window.setInterval(() => this._tick(), TICK_MS);
    this._render();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    window.clearInterval(this._timer);
    this._status.changed.disconnect(this._render, this);
    super.dispose();
  }

  private _render(): void {
    const node = this.node;
    node.replaceChildren();
    const status = this._status;
    const header = document.createElement('div');
    header.className = 'nbisolate-popup-header';
    const workers = status.foreground;
    header.textContent = !status.available
      ? 'nbisolate is not loaded in this kernel'
      : workers.length === 0
        ? 'No isolated worker is running'
        : `${plural(workers.length, 'isolated worker')} running`;
    node.appendChild(header);
    if (status.available && status.activeJobs.length) {
      node.appendChild(this._jobs(status.activeJobs));
    }
    if (!workers.length) {
      return;
    }
    const table = document.createElement('table');
    table.className = 'nbisolate-workers';
    const head = table.createTHead().insertRow();
    for (const title of ['Cell', 'PID', 'Elapsed', 'Timeout', '']) {
      const th = document.createElement('th');
      th.textContent = title;
      head.appendChild(th);
    }
    const body = table.createTBody();
    for (const worker of workers) {
      body.appendChild(this._row(worker));
    }
    node.appendChild(table);
  }

  /** Background jobs (`%%isolate --bg`), apart from the cells running now. */
  private _jobs(jobs: readonly IJob[]): HTMLElement {
    const section = document.createElement('div');
    section.className = 'nbisolate-jobs';
    const title = document.createElement('div');
    title.className = 'nbisolate-popup-header';
    title.textContent = `${plural(jobs.length, 'background job')}`;
    section.appendChild(title);
    const table = document.createElement('table');
    table.className = 'nbisolate-workers nbisolate-jobs-table';
    const head = table.createTHead().insertRow();
    for (const name of ['Job', 'Cell', 'State', 'Elapsed', '']) {
      const th = document.createElement('th');
      th.textContent = name;
      head.appendChild(th);
    }
    const body = table.createTBody();
    for (const job of jobs) {
      const row = body.insertRow();
      row.className = 'nbisolate-job';
      row.dataset.job = String(job.id);
      const workers = this._status.workers.filter(w => w.job === job.id);
      if (job.cell) {
        row.title = 'Show the cell';
        const asWorker: IWorker = {
          id: `job-${job.id}`, label: job.label, pid: null, started: job.started ?? 0,
          timeout: null, host: workers[0]?.host ?? '', cell: job.cell, job: job.id
        };
        row.addEventListener('click', () => this._reveal(this._status, asWorker));
      }
      const texts = [
        String(job.id),
        jobTitle(job),
        job.state,
        job.started === null ? '–' : formatDuration(Date.now() / 1000 - job.started)
      ];
      const classes = ['nbisolate-job-id', 'nbisolate-worker-label', 'nbisolate-job-state',
        'nbisolate-job-elapsed'];
      texts.forEach((text, i) => {
        const td = row.insertCell();
        td.className = classes[i];
        td.textContent = text;
      });
      const button = stopButton(
        `Stop background job ${job.id} and every process it started; nothing is bound.`,
        () => this._status.stopJob(job.id)
      );
      row.insertCell().appendChild(button);
    }
    section.appendChild(table);
    return section;
  }

  private _row(worker: IWorker): HTMLTableRowElement {
    const row = document.createElement('tr');
    row.className = 'nbisolate-worker';
    row.dataset.id = worker.id;
    if (worker.cell) {
      row.dataset.cellId = worker.cell.id;
      row.title = 'Show the cell';
      row.addEventListener('click', () => this._reveal(this._status, worker));
    }
    const cells = [
      workerTitle(worker),
      worker.pid === null ? '–' : String(worker.pid),
      formatDuration(elapsed(worker)),
      worker.timeout === null ? 'none' : formatLimit(worker.timeout)
    ];
    const classes = [
      'nbisolate-worker-label',
      'nbisolate-worker-pid',
      'nbisolate-worker-elapsed',
      'nbisolate-worker-timeout'
    ];
    cells.forEach((text, i) => {
      const td = row.insertCell();
      td.className = classes[i];
      td.textContent = text;
      if (i === 0) {
        td.title = worker.host ? `${text} (${worker.host})` : text;
      }
    });
    const button = stopButton(
      `Stop worker ${worker.pid ?? worker.id}, as an interrupt does: the cell raises ` +
        'KeyboardInterrupt and no notebook variable changes.',
      () => void this._status.stop(worker.id)
    );
    row.insertCell().appendChild(button);
    return row;
  }

  private _tick(): void {
    const now = Date.now() / 1000;
    for (const job of this._status.activeJobs) {
      const cell = this.node.querySelector(
        `tr.nbisolate-job[data-job="${job.id}"] .nbisolate-job-elapsed`
      );
      if (cell && job.started !== null) {
        cell.textContent = formatDuration(now - job.started);
      }
    }
    for (const worker of this._status.workers) {
      const row = this.node.querySelector(
        `tr.nbisolate-worker[data-id="${CSS.escape(worker.id)}"] .nbisolate-worker-elapsed`
      );
      if (row) {
        row.textContent = formatDuration(elapsed(worker, now));
      }
    }
  }

  private _status: IsolateStatus;
  private _reveal: RevealCell;
  private _timer: number;
}
