// Run states: each has a colour, an icon and a word, so none relies on colour alone.
import {h} from './dom.js';

// `skipped`: a choice chose another child, so this node (and its subtree) never ran.
export const STATES = ['pending', 'executing', 'complete', 'error', 'cancelled', 'skipped'];
export const TERMINAL = new Set(['complete', 'error', 'cancelled', 'skipped']);

const ICONS = {pending: '○', executing: '◐', complete: '✓', error: '✕', cancelled: '⊘', skipped: '↷'};

/** A state badge: icon + word, coloured. */
export function stateBadge(state, {small = false} = {}) {
  return h('span', {class: `state state-${state}${small ? ' small' : ''}`},
    h('span', {class: 'state-icon', 'aria-hidden': 'true'}, ICONS[state] || '?'), ` ${state}`);
}

export function stateIcon(state) {
  return h('span', {class: `state-dot state-${state}`, 'aria-hidden': 'true'}, ICONS[state] || '?');
}
