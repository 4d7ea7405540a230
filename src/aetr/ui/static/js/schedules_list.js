// #/schedules: every schedule with its next time and latest runs (linked to their pages), paused and resumed here.
import {api} from './api.js';
import {announce, fmtTime, fromNow, h, notice, replace, shortId, stepLink, toast} from './dom.js';
import {STATES, stateBadge} from './states.js';

const REFRESH_MS = 5000;  // the list is read again this often while it is on screen (next times move on)

function runBadge(run) {
  // A due time whose run was not started (`starting`, `refused`) or is gone (`deleted`) has no run state.
  const badge = STATES.includes(run.state) ? stateBadge(run.state, {small: true})
    : h('span', {class: `state small state-${run.state === 'refused' ? 'error' : 'pending'}`}, run.state);
  const due = `due ${fmtTime(run.due_at)}`;
  if (!run.id) return h('span', {class: 'last-run', title: run.error || due}, badge);
  // Labelled by due time: a schedule's run ids begin alike (they are ordered by time), its due times do not.
  return h('a', {class: 'last-run', href: `#/runs/${run.id}`, title: `run ${shortId(run.id)}…, ${due}`,
    'aria-label': `Run ${run.id}, ${run.state}, ${due}`}, badge, h('span', {class: 'small'}, ` ${fmtTime(run.due_at)}`));
}

export function renderSchedulesList(ctx) {
  ctx.setTitle('Schedules');
  const body = h('div', {class: 'card flush'}, h('p', {class: 'loading pad'}, 'Loading schedules…'));
  ctx.main.append(
    h('div', {class: 'page-head'}, h('h1', {}, 'Schedules')),
    h('p', {class: 'lead'}, 'A schedule starts a run of a step at the times a cron expression names, in its time ',
      'zone. Each due time starts one run, whichever AETR processes are up; a time missed while none was up ',
      'starts one catch-up run.'),
    body);
  let timer = null;
  let stopped = false;

  function row(schedule) {
    const toggle = h('button', {type: 'button', class: schedule.enabled ? 'button' : 'button primary',
      'data-action': schedule.enabled ? 'pause' : 'resume',
      'aria-label': `${schedule.enabled ? 'Pause' : 'Resume'} ${schedule.name}`},
    schedule.enabled ? 'Pause' : 'Resume');
    toggle.addEventListener('click', async () => {
      toggle.disabled = true;
      try {
        const next = !schedule.enabled;
        await api.putSchedule(schedule.name, {...schedule, enabled: next});
        const said = next ? `${schedule.name} resumed` : `${schedule.name} paused`;
        toast(said, 'ok');
        announce(said);
        await load();
      } catch (error) {
        toast(`Could not change ${schedule.name}: ${error.message}`, 'error');
        toggle.disabled = false;
      }
    });
    const next = schedule.next_run_at
      ? [fmtTime(schedule.next_run_at), h('span', {class: 'muted small'}, ` ${fromNow(schedule.next_run_at)}`)]
      : h('span', {class: 'muted'}, 'paused');
    return h('tr', {'data-schedule': schedule.name},
      h('td', {'data-label': 'Name', class: 'strong nowrap'}, schedule.name),
      h('td', {'data-label': 'Step', class: 'nowrap'}, stepLink(schedule.step)),
      h('td', {'data-label': 'When', class: 'nowrap'}, h('code', {}, schedule.cron),
        h('span', {class: 'muted small'}, ` ${schedule.timezone}`)),
      h('td', {'data-label': 'Next run', class: 'next-run'}, next),
      h('td', {'data-label': 'Last runs'}, schedule.last_runs.length
        ? h('div', {class: 'last-runs'}, schedule.last_runs.map(runBadge)) : h('span', {class: 'muted'}, 'none yet')),
      h('td', {'data-label': ''}, toggle));
  }

  function show(schedules) {
    if (!schedules.length) {
      replace(body, h('div', {class: 'empty pad'},
        h('p', {}, 'No schedules yet.'),
        h('p', {class: 'muted'}, 'Add a document with ', h('code', {}, 'kind: schedule'), ' (a name, a step, a ',
          h('code', {}, 'cron'), ' and optionally a ', h('code', {}, 'timezone'), ' and an ', h('code', {}, 'input'),
          ') to a step file and run ', h('code', {}, 'aetr apply -f FILE'), ', or PUT /api/v1/schedules/NAME.')));
      return;
    }
    replace(body, h('table', {class: 'table responsive schedules'},
      h('caption', {class: 'visually-hidden'}, 'Schedules'),
      h('thead', {}, h('tr', {}, ['Name', 'Step', 'When', 'Next run', 'Last runs', ''].map(
        (title) => h('th', {scope: 'col'}, title)))),
      h('tbody', {}, schedules.map(row))));
  }

  async function load() {
    clearTimeout(timer);
    try {
      show(await api.schedules());
    } catch (error) {
      replace(body, notice('error', 'Could not load the schedules', error.message));
    }
    if (!stopped) timer = setTimeout(load, REFRESH_MS);
  }

  load();
  return {cleanup: () => { stopped = true; clearTimeout(timer); }};
}
