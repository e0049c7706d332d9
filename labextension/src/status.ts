// Front end of the `nbisolate.status` comm: one IsolateStatus per notebook session.
//
// The kernel side (nbisolate/labcomm.py) sends {"workers": [...], "jobs": [...]} on
// open and on every change ("jobs" once a background cell ran); we send
// {"action": "refresh"}, {"action": "stop", "id": ...} or {"action": "stop_job", "job": ...}.
import type { ISessionContext } from '@jupyterlab/apputils';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import type { IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

export const COMM_TARGET = 'nbisolate.status';

/** The cell that runs a worker: its id in the notebook, `In [n]`, and its request. */
export interface IWorkerCell {
  id: string;
  count: number | null;
  msg_id: string;
}

/** What the kernel knows of panels a page shows without having seen them end. */
export interface ILookup {
  live: string[];
  outcomes: { [displayId: string]: { [mime: string]: string } };
}

/** One running isolated worker, as the kernel describes it. */
export interface IWorker {
  /** The cell that started it, when the kernel knows. */
  cell?: IWorkerCell | null;
  id: string;
  label: string;
  pid: number | null;
  /** Start time, epoch seconds (kernel host clock). */
  started: number;
  /** Timeout in seconds, or null for none. */
  timeout: number | null;
  host: string;
  /** The background job (`%%isolate --bg`) this worker runs for, if any. */
  job?: number | null;
}

/** One background job (`%%isolate --bg`), as nbisolate/background.py describes it. */
export interface IJob {
  id: number;
  label: string;
  state: 'queued' | 'running' | 'done' | 'failed' | 'stopped';
  /** Epoch seconds (kernel host clock), null while queued. */
  started: number | null;
  ended: number | null;
  cell: IWorkerCell | null;
  /** `ValueError: ...` for a failed or stopped job. */
  error: string | null;
  bound: string[];
  kept: string[];
}

/** One output of a background job's cell, kept by the kernel to show a new view again. */
export interface IReplayed {
  output: any;
  /** The display id it was shown with, so later updates find it. */
  display_id?: string | null;
}

/** Whether a job still runs or waits. */
export function jobActive(job: IJob): boolean {
  return job.state === 'queued' || job.state === 'running';
}

function isJob(value: unknown): value is IJob {
  const j = value as IJob;
  return typeof j === 'object' && j !== null && typeof j.id === 'number' && typeof j.state === 'string';
}

/** Python expression telling whether the extension is loaded in an IPython kernel. */
const LOADED_EXPRESSION =
  "'nbisolate' in getattr(get_ipython(), 'extension_manager').loaded";

/** How long a kernel may take to answer kernel_info before it counts as busy. */
const KERNEL_INFO_WAIT_MS = 3500;

/** Code that mentions the extension may have loaded it: look again once it ran. */
const MENTIONS_NBISOLATE = /nbisolate|%%isolate/;

function isWorker(value: unknown): value is IWorker {
  const w = value as IWorker;
  return (
    typeof w === 'object' &&
    w !== null &&
    typeof w.id === 'string' &&
    typeof w.started === 'number'
  );
}

/** Whether the comm's messages travel on a kernel subshell (JupyterLab >= 4.6). */
function commSubshell(comm: Kernel.IComm): string | null {
  return ((comm as any).subshellId as string | null | undefined) ?? null;
}

/**
 * The isolated workers of one notebook's kernel.
 *
 * `available` is true while the status comm is open, i.e. nbisolate is loaded in
 * the kernel.  The comm is opened again after a kernel restart or change, and when
 * a cell that mentions nbisolate ran while it was closed.
 */
export class IsolateStatus implements IDisposable {
  constructor(sessionContext: ISessionContext) {
    this._sessionContext = sessionContext;
    sessionContext.kernelChanged.connect(this._onKernelChanged, this);
    sessionContext.statusChanged.connect(this._onStatusChanged, this);
    sessionContext.iopubMessage.connect(this._onIOPub, this);
    this._setKernel(sessionContext.session?.kernel ?? null);
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /**
   * Whether nbisolate is loaded in the kernel, each time that becomes known: the
   * status comm worked (true) or a probe found it is not loaded (false).
   */
  get known(): ISignal<this, boolean> {
    return this._known;
  }

  /** A background job this page saw running has ended (done, failed or stopped). */
  get jobEnded(): ISignal<this, IJob> {
    return this._jobEnded;
  }

  /** The kernel restarted or died: every worker it had is gone. */
  get kernelLost(): ISignal<this, string> {
    return this._kernelLost;
  }

  /** Whether this page sent the execute request `msgId` (a reloaded page did not). */
  sentRequest(msgId: string): boolean {
    return this._sent.has(msgId);
  }

  /** Ask the kernel which of these panels still run and how the others ended. */
  lookup(displayIds: string[]): Promise<ILookup> {
    const comm = this._comm;
    if (!comm || comm.isDisposed) {
      return Promise.resolve({ live: [], outcomes: {} });
    }
    return new Promise<ILookup>(resolve => {
      this._lookups.push(resolve);
      comm.send({ action: 'lookup', display_ids: displayIds });
    });
  }

  /**
   * The output a background job's cell has had so far, as the kernel kept it (for a
   * page that reloaded while the job runs); empty if the kernel has none.
   */
  replay(jobId: number): Promise<IReplayed[]> {
    const comm = this._comm;
    if (!comm || comm.isDisposed) {
      return Promise.resolve([]);
    }
    return new Promise<IReplayed[]>(resolve => {
      const waiting = this._replays.get(jobId) ?? [];
      waiting.push(resolve);
      this._replays.set(jobId, waiting);
      comm.send({ action: 'replay_job', job: jobId });
    });
  }

  /** Ask the kernel to show the live panel of the cell whose request is `msgId` again. */
  mirror(msgId: string): void {
    if (this._comm && !this._comm.isDisposed) {
      this._comm.send({ action: 'mirror', msg_id: msgId });
    }
  }

  get available(): boolean {
    return this._available;
  }

  get workers(): readonly IWorker[] {
    return this._workers;
  }

  /** Workers of cells that are running now (not of background jobs). */
  get foreground(): readonly IWorker[] {
    return this._workers.filter(w => w.job === null || w.job === undefined);
  }

  /** Background jobs: queued and running ones, then the newest that ended. */
  get jobs(): readonly IJob[] {
    return this._jobs;
  }

  /** Background jobs that are queued or running. */
  get activeJobs(): readonly IJob[] {
    return this._jobs.filter(jobActive);
  }

  get isDisposed(): boolean {
    return this._isDisposed;
  }

  get sessionContext(): ISessionContext {
    return this._sessionContext;
  }

  dispose(): void {
    if (this._isDisposed) {
      return;
    }
    this._isDisposed = true;
    this._closeComm();
    Signal.clearData(this);
  }

  /**
   * Load nbisolate in the kernel unless the status comm shows it is loaded.
   *
   * The silent `%load_ext` is sent at once, so it runs before whatever is sent
   * next; the returned promise tells whether it worked.
   */
  ensureLoaded(): Promise<void> {
    const kernel = this._kernel;
    if (!kernel || this._comm) {
      return Promise.resolve();
    }
    const future = kernel.requestExecute({
      code: '%load_ext nbisolate',
      silent: true,
      store_history: false
    });
    return future.done.then(reply => {
      const content = reply.content;
      if (content.status === 'error') {
        throw new Error(
          `Could not load nbisolate in the kernel: ${content.ename}: ${content.evalue}`
        );
      }
      if (!this._comm && kernel === this._kernel && !kernel.isDisposed) {
        // Not a probe: that would queue behind the cell about to run.
        void this._openComm(kernel);
      }
    });
  }

  /** Ask the kernel whether nbisolate is loaded, and open the comm if so. */
  probe(): Promise<boolean> {
    if (this._comm) {
      return Promise.resolve(true);
    }
    if (this._probing) {
      return this._probing;
    }
    const kernel = this._kernel;
    if (!kernel || kernel.isDisposed) {
      return Promise.resolve(false);
    }
    const probing = (async () => {
      try {
        const reply = await this._probeRequest(kernel);
        if (kernel !== this._kernel || this._isDisposed) {
          return false;
        }
        const content = reply.content as KernelMessage.IExecuteReplyMsg['content'];
        if (content.status !== 'ok') {
          return false;
        }
        const result = (content.user_expressions ?? {})['nbisolate'] as any;
        const loaded =
          result?.status === 'ok' && result?.data?.['text/plain'] === 'True';
        if (loaded && !this._comm) {
          await this._openComm(kernel);
        } else if (!loaded) {
          this._known.emit(false);
        }
        return loaded;
      } catch (reason) {
        console.debug('nbisolate: probing the kernel failed', reason);
        return false;
      } finally {
        this._probing = null;
      }
    })();
    this._probing = probing;
    return probing;
  }

  /**
   * The silent request that asks whether nbisolate is loaded.
   *
   * On the main shell it would wait behind a running cell: a page reloaded while an
   * isolated cell runs would find nothing until that cell ends.  A kernel with
   * subshells (JEP 91) answers on a subshell of our own at once.
   */
  private async _probeRequest(
    kernel: Kernel.IKernelConnection
  ): Promise<KernelMessage.IExecuteReplyMsg> {
    const content = {
      code: '',
      silent: true,
      store_history: false,
      user_expressions: { nbisolate: LOADED_EXPRESSION }
    };
    if (!(kernel as any).supportsSubshells) {
      return (await kernel.requestExecute(content, true).done) as KernelMessage.IExecuteReplyMsg;
    }
    const created = await (kernel as any).requestCreateSubshell({}, true).done;
    const subshellId = created.content.subshell_id as string;
    try {
      const msg = KernelMessage.createMessage({
        msgType: 'execute_request',
        channel: 'shell',
        username: kernel.username,
        session: kernel.clientId,
        subshellId,
        content
      } as any);
      return (await kernel.sendShellMessage(msg as any, true, true)
        .done) as KernelMessage.IExecuteReplyMsg;
    } finally {
      if (!kernel.isDisposed) {
        void (kernel as any)
          .requestDeleteSubshell({ subshell_id: subshellId }, true)
          .done.catch(() => undefined);
      }
    }
  }

  /** Ask the kernel for a fresh list. */
  refresh(): void {
    if (this._comm && !this._comm.isDisposed) {
      this._comm.send({ action: 'refresh' });
    } else {
      void this.probe();
    }
  }

  /**
   * Stop one worker.
   *
   * With a kernel subshell the request is handled at once.  Without one, the
   * kernel reads it only after the running cell; if the kernel is busy, that
   * cell is the one waiting on the worker, so interrupt it, as the kernel side's
   * stop would.
   */
  async stop(id: string): Promise<void> {
    const comm = this._comm;
    const kernel = this._kernel;
    if (!comm || comm.isDisposed || !kernel) {
      return;
    }
    comm.send({ action: 'stop', id });
    if (!commSubshell(comm) && kernel.status === 'busy') {
      await kernel.interrupt();
    }
  }

  /** Stop a background job (queued or running); the kernel handles it at once. */
  stopJob(id: number): void {
    if (this._comm && !this._comm.isDisposed) {
      this._comm.send({ action: 'stop_job', job: id });
    }
  }

  private _onKernelChanged(
    _sender: ISessionContext,
    args: { newValue: Kernel.IKernelConnection | null }
  ): void {
    this._setKernel(args.newValue);
  }

  private _setKernel(kernel: Kernel.IKernelConnection | null): void {
    this._closeComm();
    this._mentioning.clear();
    this._kernel?.anyMessage.disconnect(this._onAnyMessage, this);
    this._kernel = kernel;
    kernel?.anyMessage.connect(this._onAnyMessage, this);
    this._setState(false, []);
    if (kernel) {
      // Extensions loaded at kernel start-up (IPython config) show up here.
      let answered = false;
      void kernel.info
        .then(() => {
          answered = true;
          return this.probe();
        })
        .catch(() => undefined);
      // A kernel answers kernel_info on its main shell, so not while a cell runs there
      // (a page reloaded during an isolated cell).  JupyterLab sends what waits after a
      // few seconds anyway: open the status comm then, which the kernel handles at once
      // (a kernel without nbisolate closes it again).
      setTimeout(() => {
        if (!answered && this._kernel === kernel && !this._comm && !kernel.isDisposed) {
          void this._openComm(kernel);
        }
      }, KERNEL_INFO_WAIT_MS);
    }
  }

  private _onAnyMessage(
    _sender: Kernel.IKernelConnection,
    args: Kernel.IAnyMessageArgs
  ): void {
    if (args.direction === 'send' && args.msg.header.msg_type === 'execute_request') {
      this._sent.add(args.msg.header.msg_id);
      if (this._sent.size > 1000) {
        this._sent.delete(this._sent.values().next().value as string);
      }
    }
  }

  private _onStatusChanged(
    _sender: ISessionContext,
    status: Kernel.Status
  ): void {
    switch (status) {
      case 'restarting':
      case 'autorestarting':
      case 'terminating':
      case 'dead':
        // The kernel's comms are gone; its workers were stopped with it.
        this._closeComm(false);
        this._setState(false, []);
        this._kernelLost.emit(status);
        this._probeWhenIdle = status !== 'dead' && status !== 'terminating';
        break;
      case 'idle':
        if (this._probeWhenIdle) {
          this._probeWhenIdle = false;
          void this.probe();
        }
        break;
      default:
        break;
    }
  }

  private _onIOPub(
    _sender: ISessionContext,
    msg: KernelMessage.IMessage
  ): void {
    if (this._comm) {
      this._mentioning.clear();
      return;
    }
    const type = msg.header.msg_type;
    if (type === 'execute_input') {
      const code = (msg as unknown as KernelMessage.IExecuteInputMsg).content.code ?? '';
      const parent = (msg.parent_header as KernelMessage.IHeader).msg_id;
      if (parent && MENTIONS_NBISOLATE.test(code)) {
        this._mentioning.add(parent);
      }
    } else if (type === 'status') {
      const state = (msg as unknown as KernelMessage.IStatusMsg).content.execution_state;
      const parent = (msg.parent_header as KernelMessage.IHeader).msg_id;
      if (state === 'idle' && parent && this._mentioning.delete(parent) && this._kernel) {
        // That cell may have loaded nbisolate.  Open the comm right away rather
        // than probe: a probe would wait for the cells queued after it, while
        // comm messages are handled as soon as they arrive.
        void this._openComm(this._kernel);
      }
    }
  }

  private async _openComm(kernel: Kernel.IKernelConnection): Promise<void> {
    if (this._comm) {
      return;
    }
    let comm: Kernel.IComm;
    try {
      comm = kernel.createComm(COMM_TARGET);
    } catch (reason) {
      console.warn('nbisolate: cannot open the status comm', reason);
      return;
    }
    this._comm = comm;
    let worked = false;
    comm.onMsg = msg => {
      if (this._comm !== comm) {
        return;
      }
      const data = msg.content.data as any;
      if (data?.replay) {
        const jobId = data.replay.job as number;
        const waiting = this._replays.get(jobId) ?? [];
        this._replays.delete(jobId);
        const outputs = Array.isArray(data.replay.outputs) ? data.replay.outputs : [];
        waiting.forEach(resolve => resolve(outputs as IReplayed[]));
        return;
      }
      if (data?.lookup) {
        this._lookups.shift()?.(data.lookup as ILookup);
        return;
      }
      const workers = data?.workers;
      if (Array.isArray(workers)) {
        const first = !worked;
        worked = true;
        const jobs = Array.isArray(data?.jobs) ? (data.jobs as unknown[]).filter(isJob) : [];
        this._noteJobs(jobs);
        this._setState(true, workers.filter(isWorker), jobs);
        if (first) {
          this._known.emit(true);
        }
      }
    };
    comm.onClose = () => {
      if (this._comm !== comm) {
        return;
      }
      this._comm = null;
      this._setState(false, []);
      if (worked && !this._isDisposed) {
        // The kernel dropped a comm that worked (it keeps only so many, and a
        // closed browser tab never closes its own): ask again.
        setTimeout(() => void this.probe(), 1000);
      }
    };
    // JupyterLab 4.6+ sends comm messages over a kernel subshell, so that the
    // kernel handles them while a cell runs; open the comm there too.
    const subshellStarted = (comm as any).subshellStarted as
      | Promise<void>
      | undefined;
    if (subshellStarted && (kernel as any).supportsSubshells) {
      await Promise.race([
        subshellStarted,
        new Promise(resolve => setTimeout(resolve, 5000))
      ]).catch(() => undefined);
    }
    if (this._comm !== comm || comm.isDisposed || kernel.isDisposed) {
      return;
    }
    comm.open({});
  }

  private _closeComm(tellKernel = true): void {
    const comm = this._comm;
    this._comm = null;
    for (const resolve of this._lookups.splice(0)) {
      resolve({ live: [], outcomes: {} });
    }
    for (const waiting of this._replays.values()) {
      waiting.forEach(resolve => resolve([]));
    }
    this._replays.clear();
    if (!comm || comm.isDisposed) {
      return;
    }
    try {
      if (tellKernel) {
        comm.close();
      }
    } catch {
      // The kernel connection is already gone.
    }
    if (!comm.isDisposed) {
      comm.dispose();
    }
  }

  /** Announce the jobs that ended since the last message (only those seen active here). */
  private _noteJobs(jobs: IJob[]): void {
    for (const job of jobs) {
      const before = this._jobStates.get(job.id);
      if (before !== undefined && before !== 'done' && before !== 'failed' && before !== 'stopped'
          && !jobActive(job)) {
        this._jobEnded.emit(job);
      }
      this._jobStates.set(job.id, job.state);
    }
  }

  private _setState(available: boolean, workers: IWorker[], jobs: IJob[] = []): void {
    if (
      available === this._available &&
      workers.length === 0 &&
      this._workers.length === 0 &&
      jobs.length === 0 &&
      this._jobs.length === 0
    ) {
      return;
    }
    this._available = available;
    this._workers = workers;
    this._jobs = jobs;
    if (!available) {
      this._jobStates.clear();
    }
    this._changed.emit();
  }

  private _sessionContext: ISessionContext;
  private _kernel: Kernel.IKernelConnection | null = null;
  private _comm: Kernel.IComm | null = null;
  private _probing: Promise<boolean> | null = null;
  private _probeWhenIdle = false;
  private _mentioning = new Set<string>();
  private _available = false;
  private _workers: IWorker[] = [];
  private _jobs: IJob[] = [];
  private _jobStates = new Map<number, string>();
  private _jobEnded = new Signal<this, IJob>(this);
  private _isDisposed = false;
  private _changed = new Signal<this, void>(this);
  private _known = new Signal<this, boolean>(this);
  private _kernelLost = new Signal<this, string>(this);
  private _sent = new Set<string>();
  private _lookups: ((value: ILookup) => void)[] = [];
  private _replays = new Map<number, ((value: IReplayed[]) => void)[]>();
}

/**
 * Elapsed time as the cell's panel shows it (nbisolate.panel.fmt_clock):
 * `3.2 s`, `15 min 02 s`, `1 h 05 min`.
 */
export function formatDuration(seconds: number): string {
  const t = Math.max(0, seconds);
  if (t < 60) {
    return `${t.toFixed(1)} s`;
  }
  const minutes = Math.floor(t / 60);
  if (minutes < 60) {
    return `${minutes} min ${String(Math.floor(t % 60)).padStart(2, '0')} s`;
  }
  return `${Math.floor(minutes / 60)} h ${String(minutes % 60).padStart(2, '0')} min`;
}

/** A timeout as the panel shows it (`of 60 s`): the seconds given to --timeout. */
export function formatLimit(seconds: number): string {
  return `${Number(seconds.toPrecision(6))} s`;
}

/** Seconds a worker has run, by the browser's clock. */
export function elapsed(worker: IWorker, now = Date.now() / 1000): number {
  return Math.max(0, now - worker.started);
}
