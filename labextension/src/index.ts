import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, showErrorMessage } from '@jupyterlab/apputils';
import type { ISessionContext } from '@jupyterlab/apputils';
import type { CodeCell } from '@jupyterlab/cells';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { OutputArea } from '@jupyterlab/outputarea';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';

import { IsolateStatus } from './status';
import { IsolateStatusItem } from './statusbar';

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

/** The cell text with the `%%isolate` first line added or removed. */
export function toggleMagic(source: string): string {
  if (hasMagic(source)) {
    const newline = source.indexOf('\n');
    return newline === -1 ? '' : source.slice(newline + 1);
  }
  return `${MAGIC}\n${source}`;
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
  const code = hasMagic(source) ? source : `${MAGIC}\n${source}`;
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
  optional: [ICommandPalette, IStatusBar],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    palette: ICommandPalette | null,
    statusBar: IStatusBar | null
  ) => {
    const { commands } = app;
    const statuses = new Map<NotebookPanel, IsolateStatus>();

    const statusFor = (panel: NotebookPanel): IsolateStatus => {
      let status = statuses.get(panel);
      if (!status) {
        status = new IsolateStatus(panel.sessionContext);
        statuses.set(panel, status);
        panel.disposed.connect(() => {
          statuses.get(panel)?.dispose();
          statuses.delete(panel);
        });
      }
      return status;
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

    commands.addCommand(CommandIDs.runIsolated, {
      label: 'Run Cell Isolated',
      caption: 'Run the active cell in a fresh process (%%isolate)',
      icon: isolateIcon,
      isEnabled: () => activeCodeCell() !== null,
      execute: async () => {
        const panel = currentPanel();
        const cell = activeCodeCell();
        if (!panel || !cell) {
          return;
        }
        await panel.sessionContext.ready;
        await executeIsolated(cell, panel.sessionContext, statusFor(panel));
      }
    });

    commands.addCommand(CommandIDs.toggleIsolate, {
      label: 'Toggle %%isolate',
      caption: 'Add or remove the %%isolate first line of the active cell',
      isEnabled: () => activeCodeCell() !== null,
      execute: () => {
        const cell = activeCodeCell();
        if (!cell) {
          return;
        }
        const shared = cell.model.sharedModel;
        shared.setSource(toggleMagic(shared.getSource()));
      }
    });

    let item: IsolateStatusItem | null = null;
    commands.addCommand(CommandIDs.showWorkers, {
      label: 'Show Isolated Workers',
      caption: 'List the isolated workers of the current notebook’s kernel',
      isEnabled: () => item !== null && currentPanel() !== null,
      execute: () => item?.openPopup()
    });

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

    if (statusBar) {
      item = new IsolateStatusItem(tracker, statusFor);
      statusBar.registerStatusItem(PLUGIN_ID, {
        item,
        align: 'left',
        rank: 4,
        isActive: () => item!.hasContent,
        activeStateChanged: item.contentChanged
      });
    }

    tracker.activeCellChanged.connect(() => {
      commands.notifyCommandChanged(CommandIDs.runIsolated);
      commands.notifyCommandChanged(CommandIDs.toggleIsolate);
    });
    console.debug(`${PLUGIN_ID} is activated`);
  }
};

export default plugin;
