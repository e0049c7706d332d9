import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  Dialog,
  ICommandPalette,
  Notification,
  showErrorMessage
} from '@jupyterlab/apputils';
import type { ISessionContext } from '@jupyterlab/apputils';
import type { Cell, CodeCell, ICellModel } from '@jupyterlab/cells';
import { IMainMenu } from '@jupyterlab/mainmenu';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { OutputArea } from '@jupyterlab/outputarea';
import { IRunningSessionManagers } from '@jupyterlab/running';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { Signal } from '@lumino/signaling';

import { CellFollower } from './reconnect';
import { elapsed, formatDuration, IJob, IsolateStatus, IWorker } from './status';
import { IsolateStatusItem, jobTitle, WorkerList, workerTitle } from './statusbar';

const PLUGIN_ID = 'nbisolate:plugin';

export namespace CommandIDs {
  export const runIsolated = 'nbisolate:run-isolated';
  export const toggleIsolate = 'nbisolate:toggle-isolate';
  export const showWorkers = 'nbisolate:show-workers';
}

const MAGIC = '%%isolate';
/** A first line that is the `%%isolate` cell magic, with or without options. */
const MAGIC_LINE = /^%%isolate(?:[ \t].*)?$/;

const isolateIcon = new LabIcon({
  name: 'nbisolate:isolate',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">' +
    '<g class="jp-icon3" fill="#616161">' +
    '<path d="M3 3h8v2H5v14h6v2H3z" />' +
    '<path d="M13 3h8v18h-8v-2h6V5h-6z" />' +
    '<path d="M9 8l7 4-7 4z" />' +
    '</g></svg>'
});

/** Whether the cell text starts with the `%%isolate` magic line. */
export function hasMagic(source: string): boolean {
  return MAGIC_LINE.test(source.split('\n', 1)[0].trimEnd());
}

/** The options on the `%%isolate` line (`--timeout 5`), or '' without one. */
export function magicOptions(source: string): string {
  return hasMagic(source)
    ? source.split('\n', 1)[0].slice(MAGIC.length).trim()
    : '';
}

/** The `%%isolate` line with these options. */
function magicLine(options: string): string {
  return options ? `${MAGIC} ${options}` : MAGIC;
}

/** The cell text with the `%%isolate` first line added (with `options`) or removed. */
export function toggleMagic(source: string, options = ''): string {
  if (hasMagic(source)) {
    const newline = source.indexOf('\n');
    return newline === -1 ? '' : source.slice(newline + 1);
  }
  return `${magicLine(options)}\n${source}`;
}

/**
 * The cell metadata nbisolate keeps (nbisolate.labcomm.METADATA_KEY):
 * `isolate` marks a cell run with "Run Cell Isolated", so that the kernel runs it
 * isolated however it is run next (Shift+Enter, Run All); `options` keeps the
 * magic line's options while "Toggle %%isolate" has the line removed.
 */
const METADATA_KEY = 'nbisolate';

interface IMark {
  isolate?: boolean;
  options?: string;
}

function getMark(model: ICellModel): IMark {
  const value = model.getMetadata(METADATA_KEY);
  return value && typeof value === 'object' ? (value as IMark) : {};
}

function setMark(model: ICellModel, mark: IMark): void {
  const clean: IMark = {};
  if (mark.isolate) {
    clean.isolate = true;
  }
  if (mark.options) {
    clean.options = mark.options;
  }
  if (Object.keys(clean).length) {
    model.setMetadata(METADATA_KEY, clean as any);
  } else {
    model.deleteMetadata(METADATA_KEY);
  }
}

/** Whether a cell runs isolated: it has the magic line, or the mark. */
function isIsolated(model: ICellModel): boolean {
  return hasMagic(model.sharedModel.getSource()) || getMark(model).isolate === true;
}

const MARK_CLASS = 'nbisolate-mod-isolated';

/** Show the mark on a cell (a badge by its prompt), and keep it in step with the metadata. */
function trackMark(cell: Cell): void {
  const update = () => {
    if (!cell.isDisposed) {
      cell.toggleClass(MARK_CLASS, getMark(cell.model).isolate === true);
    }
  };
  cell.model.metadataChanged.connect(update);
  update();
}

/**
 * Run a code cell's text under `%%isolate` without changing the text, the way
 * CodeCell.execute runs it.
 */
async function executeIsolated(
  cell: CodeCell,
  sessionContext: ISessionContext,
  status: IsolateStatus
): Promise<void> {
  const model = cell.model;
  const source = model.sharedModel.getSource();
  if (!source.trim() || !sessionContext.session?.kernel) {
    return;
  }
  const code = hasMagic(source)
    ? source
    : `${magicLine(getMark(model).options ?? '')}\n${source}`;
  // Sent first, so the kernel loads the extension before it runs the cell.
  const loaded = status.ensureLoaded();

  model.sharedModel.transact(
    () => {
      model.clearExecution();
      cell.outputHidden = false;
    },
    false
  );
  if ('executionState' in model) {
    model.executionState = 'running';
  } else {
    (cell as any).setPrompt('*');
  }
  model.trusted = true;
  const metadata = {
    ...model.metadata,
    cellId: model.sharedModel.getId()
  };
  const running = OutputArea.execute(
    code,
    cell.outputArea,
    sessionContext,
    metadata
  );
  const future = cell.outputArea.future;

  loaded.catch(reason => {
    void showErrorMessage('Run cell isolated', reason);
  });
  try {
    const reply = await running;
    if (reply && !cell.isDisposed) {
      model.executionCount = reply.content.execution_count;
    }
  } catch (reason) {
    if (!cell.isDisposed && cell.outputArea.future === future) {
      if ('executionState' in model) {
        model.executionState = 'idle';
      } else {
        (cell as any).setPrompt('');
      }
    }
    if (!(reason instanceof Error && reason.message.startsWith('Canceled'))) {
      throw reason;
    }
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description:
    'Run notebook cells isolated (%%isolate) and show the kernel’s isolated workers in the status bar.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette, IStatusBar, IRunningSessionManagers, IMainMenu],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    palette: ICommandPalette | null,
    statusBar: IStatusBar | null,
    runningManagers: IRunningSessionManagers | null,
    mainMenu: IMainMenu | null
  ) => {
    const { commands } = app;
    const statuses = new Map<NotebookPanel, IsolateStatus>();
    const workersChanged = new Signal<object, void>(statuses);

    const statusFor = (panel: NotebookPanel): IsolateStatus => {
      let status = statuses.get(panel);
      if (!status) {
        const created = new IsolateStatus(panel.sessionContext);
        status = created;
        statuses.set(panel, created);
        const follower = new CellFollower(panel, created);
        created.changed.connect(() => workersChanged.emit());
        created.jobEnded.connect((_sender, job) => notifyJobEnded(created, job));
        panel.disposed.connect(() => {
          follower.dispose();
          statuses.get(panel)?.dispose();
          statuses.delete(panel);
          workersChanged.emit();
        });
        panel.content.widgets.forEach(trackMark);
        panel.content.model?.cells.changed.connect(() => {
          panel.content.widgets.forEach(cell => {
            if (!cell.hasClass('nbisolate-mark-tracked')) {
              cell.addClass('nbisolate-mark-tracked');
              trackMark(cell);
            }
          });
        });
        panel.content.widgets.forEach(cell => cell.addClass('nbisolate-mark-tracked'));
      }
      return status;
    };

    /** Show the cell that runs a worker: its notebook in front, the cell selected. */
    const reveal = (status: IsolateStatus, worker: IWorker): void => {
      for (const [panel, st] of statuses) {
        if (st !== status || !worker.cell) {
          continue;
        }
        const notebook = panel.content;
        const index = notebook.widgets.findIndex(
          c => c.model.sharedModel.getId() === worker.cell!.id
        );
        if (index < 0) {
          return;
        }
        app.shell.activateById(panel.id);
        notebook.activeCellIndex = index;
        notebook.deselectAll();
        void notebook.scrollToItem(index, 'center');
        return;
      }
    };
    /** A JupyterLab notification when a background job ends, with a button to its cell. */
    const notifyJobEnded = (status: IsolateStatus, job: IJob): void => {
      const name = status.sessionContext.name || 'notebook';
      const what =
        job.state === 'done'
          ? `finished${job.bound.length ? `; bound ${job.bound.join(', ')}` : ''}` +
            (job.kept.length ? `; kept the notebook's newer ${job.kept.join(', ')}` : '')
          : job.state === 'stopped'
            ? 'was stopped; nothing was bound'
            : `failed (${job.error ?? 'see its cell'}); nothing was bound`;
      const message = `Background job ${job.id} ${jobTitle(job)} in ${name} ${what}.`;
      const actions = job.cell
        ? [
            {
              label: 'Show cell',
              caption: 'Scroll to the cell that started the job',
              callback: () =>
                reveal(status, {
                  id: `job-${job.id}`,
                  label: job.label,
                  pid: null,
                  started: job.started ?? 0,
                  timeout: null,
                  host: '',
                  cell: job.cell,
                  job: job.id
                })
            }
          ]
        : [];
      const options = { autoClose: job.state === 'done' ? 8000 : (false as const), actions };
      if (job.state === 'done') {
        Notification.success(message, options);
      } else if (job.state === 'stopped') {
        Notification.warning(message, options);
      } else {
        Notification.error(message, options);
      }
    };
    tracker.forEach(panel => statusFor(panel));
    // Tell the kernels this page is gone, so they stop sending it updates.
    window.addEventListener('pagehide', event => {
      if (event.persisted) {
        return;
      }
      statuses.forEach(status => status.dispose());
      statuses.clear();
    });
    tracker.widgetAdded.connect((_, panel) => {
      statusFor(panel);
    });

    const currentPanel = (): NotebookPanel | null => tracker.currentWidget;
    const activeCodeCell = (): CodeCell | null => {
      const cell = currentPanel()?.content.activeCell;
      return cell && cell.model.type === 'code' ? (cell as CodeCell) : null;
    };

    /** The selected code cells (or the active one), in notebook order, as Ctrl+Enter runs them. */
    const selectedCodeCells = (panel: NotebookPanel): CodeCell[] => {
      const notebook = panel.content;
      return notebook.widgets.filter(
        cell => cell.model.type === 'code' && notebook.isSelectedOrActive(cell)
      ) as CodeCell[];
    };

    commands.addCommand(CommandIDs.runIsolated, {
      label: 'Run Cell Isolated',
      caption:
        'Run the selected cells, each in a fresh process (%%isolate), and mark them to run ' +
        'isolated from now on',
      icon: isolateIcon,
      isEnabled: () => activeCodeCell() !== null,
      isToggled: () => {
        const cell = activeCodeCell();
        return cell !== null && getMark(cell.model).isolate === true;
      },
      execute: async () => {
        const panel = currentPanel();
        if (!panel) {
          return;
        }
        const cells = selectedCodeCells(panel);
        if (!cells.length) {
          return;
        }
        await panel.sessionContext.ready;
        const status = statusFor(panel);
        for (const cell of cells) {
          if (!hasMagic(cell.model.sharedModel.getSource())) {
            setMark(cell.model, { ...getMark(cell.model), isolate: true });
          }
        }
        commands.notifyCommandChanged(CommandIDs.runIsolated);
        // Sent in order at once; the kernel runs them one after another and, as for
        // Ctrl+Enter, skips the rest after an error.
        await Promise.all(
          cells.map(cell => executeIsolated(cell, panel.sessionContext, status))
        );
      }
    });

    commands.addCommand(CommandIDs.toggleIsolate, {
      label: 'Toggle %%isolate',
      caption:
        'Make the active cell run isolated (%%isolate first line) or not; the options ' +
        'on the line are kept for the next time',
      isEnabled: () => activeCodeCell() !== null,
      execute: () => {
        const cell = activeCodeCell();
        if (!cell) {
          return;
        }
        const model = cell.model;
        const shared = model.sharedModel;
        const source = shared.getSource();
        const mark = getMark(model);
        if (isIsolated(model)) {
          const options = hasMagic(source) ? magicOptions(source) : (mark.options ?? '');
          if (hasMagic(source)) {
            shared.setSource(toggleMagic(source));
          }
          setMark(model, { options });
        } else {
          shared.setSource(toggleMagic(source, mark.options ?? ''));
          setMark(model, {});
        }
        commands.notifyCommandChanged(CommandIDs.runIsolated);
      }
    });

    let item: IsolateStatusItem | null = null;
    commands.addCommand(CommandIDs.showWorkers, {
      label: 'Show Isolated Workers',
      caption: 'List the isolated workers of the current notebook’s kernel, and stop them',
      isEnabled: () => currentPanel() !== null,
      execute: async () => {
        if (item && item.isAttached && item.isVisible) {
          item.openPopup();
          return;
        }
        // No status bar (Notebook 7): the same list in a dialog.
        const panel = currentPanel();
        if (!panel) {
          return;
        }
        const status = statusFor(panel);
        status.refresh();
        const body = new WorkerList(status, (st, worker) => {
          dialog.resolve();
          reveal(st, worker);
        });
        const dialog = new Dialog({
          title: 'Isolated workers',
          body,
          buttons: [Dialog.okButton({ label: 'Close' })]
        });
        await dialog.launch();
        body.dispose();
      }
    });

    if (runningManagers) {
      const allWorkers = (): [IsolateStatus, IWorker][] => {
        const found: [IsolateStatus, IWorker][] = [];
        const seen = new Set<string>();
        for (const status of statuses.values()) {
          for (const worker of status.workers) {
            if (!seen.has(worker.id)) {
              seen.add(worker.id);
              found.push([status, worker]);
            }
          }
        }
        return found;
      };
      runningManagers.add({
        name: 'Isolated workers',
        running: () =>
          allWorkers().map(([status, worker]) => ({
            className: 'nbisolate-running-item',
            icon: () => isolateIcon,
            label: () => workerTitle(worker),
            labelTitle: () =>
              `${workerTitle(worker)}\npid ${worker.pid ?? '–'}` +
              (worker.host ? ` on ${worker.host}` : ''),
            detail: () => formatDuration(elapsed(worker)),
            open: () => reveal(status, worker),
            shutdown: () => void status.stop(worker.id)
          })),
        refreshRunning: () => statuses.forEach(status => status.refresh()),
        runningChanged: workersChanged,
        shutdownAll: () => {
          for (const [status, worker] of allWorkers()) {
            void status.stop(worker.id);
          }
        },
        shutdownLabel: 'Stop',
        shutdownAllLabel: 'Stop All',
        shutdownAllConfirmationText:
          'Stop every isolated worker? Their cells raise KeyboardInterrupt and no notebook ' +
          'variable changes.'
      });
    }

    if (palette) {
      const category = 'Notebook Cell Operations';
      for (const command of [
        CommandIDs.runIsolated,
        CommandIDs.toggleIsolate,
        CommandIDs.showWorkers
      ]) {
        palette.addItem({ command, category });
      }
    }

    if (mainMenu) {
      // Notebook 7 has a Kernel menu but no status bar: this is where its users look
      // for what runs in the kernel. In JupyterLab it opens the status bar's list.
      mainMenu.kernelMenu.addGroup([{ command: CommandIDs.showWorkers }], 100);
    }

    if (statusBar) {
      item = new IsolateStatusItem(tracker, statusFor, reveal);
      statusBar.registerStatusItem(PLUGIN_ID, {
        item,
        align: 'left',
        rank: 4,
        isActive: () => item!.hasContent,
        activeStateChanged: item.contentChanged
      });
    }

    tracker.activeCellChanged.connect(() => {
      commands.notifyCommandChanged(CommandIDs.showWorkers);
      commands.notifyCommandChanged(CommandIDs.runIsolated);
      commands.notifyCommandChanged(CommandIDs.toggleIsolate);
    });
    console.debug(`${PLUGIN_ID} is activated`);
  }
};

export default plugin;
