// Corral console: the small script layer over server-rendered pages (docs/console.md).
// Live data comes from the server's SSE stream of the event log (/ui/events, the same stream as
// /api/events, authenticated by the session cookie); forms that change state are posted with fetch
// (CSRF field included) and their answer, or the API's JSON error, is shown as a message.
(() => {
  'use strict';
  const body = document.body;
  const page = body.dataset.page;
  const $ = (s, root = document) => root.querySelector(s);
  const $$ = (s, root = document) => Array.from(root.querySelectorAll(s));
  const TYPES = ['agent.capabilities', 'agent.message', 'agent.result', 'approval.decision.submitted',
    'approval.denied', 'approval.expired', 'approval.granted', 'approval.needed', 'approval.requested',
    'cancel.requested', 'change.committed', 'change.rolled_back', 'checkpoint.created', 'checkpoint.requested',
    'commit.requested', 'control.rejected', 'execution.claimed', 'execution.crash_loop', 'execution.exited',
    'execution.failed', 'execution.paused', 'execution.queued', 'execution.requested', 'execution.resumed',
    'execution.retry_scheduled', 'execution.stalled', 'execution.started', 'execution.timed_out', 'file.touched',
    'heartbeat', 'input.delivered', 'input.requested', 'limit.exceeded', 'notification.failed',
    'notification.sent', 'output', 'pause.requested', 'pr.failed', 'pr.opened', 'pr.requested',
    'priority.changed', 'priority.requested', 'protocol.error', 'replay.diverged', 'resume.requested',
    'rollback.requested', 'session.started', 'shell.blocked', 'timeout.extend.requested', 'timeout.extended',
    'tool.called', 'tool.result', 'usage', 'validation.failed', 'validation.passed', 'workspace.created',
    'workspace.removed'];
  const STATE_OF = {
    'execution.requested': 'requested', 'execution.queued': 'queued', 'execution.claimed': 'claimed',
    'execution.started': 'running', 'execution.paused': 'paused', 'execution.resumed': 'running',
    'execution.exited': 'exited', 'execution.failed': 'failed',
  };

  // --- messages and forms ------------------------------------------------------------------------
  function flash(text, error) {
    const box = $('#flash');
    if (!box) return;
    box.textContent = text;
    box.className = error ? 'error' : 'ok';
    box.hidden = false;
  }

  document.addEventListener('submit', async (ev) => {
    const form = ev.target;
    if (!(form instanceof HTMLFormElement) || !form.hasAttribute('data-async')) return;
    ev.preventDefault();
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
    const data = new URLSearchParams(new FormData(form, ev.submitter || undefined));
    let response;
    try {
      response = await fetch(form.action, {
        method: 'POST', body: data, credentials: 'same-origin', headers: { Accept: 'application/json' },
      });
    } catch (err) {
      flash(`the server did not answer: ${err}`, true);
      return;
    }
    const answer = await response.json().catch(() => ({ error: response.statusText }));
    if (response.ok) {
      flash(answer.message || 'done', false);
      form.dispatchEvent(new CustomEvent('corral:done', { bubbles: true, detail: answer }));
      if (answer.url) window.location.assign(answer.url);
      else if (page === 'changes' && (form.closest('#diffs') || form.closest('.controls'))) {
        // the diff changed: show it again, with the message (signed by the server in `next`)
        window.setTimeout(() => window.location.assign(answer.next || window.location.pathname), 300);
      }
    } else {
      flash(`${response.status}: ${answer.error || 'refused'}`, true);
    }
  });

  // --- times -------------------------------------------------------------------------------------
  function ago(iso) {
    const t = Date.parse(iso);
    if (Number.isNaN(t)) return '';
    const s = (Date.now() - t) / 1000;
    return s < -1 ? `in ${span(-s)}` : `${span(s)} ago`;
  }
  function span(s) {
    if (s < 0) s = 0;
    if (s < 60) return `${s.toFixed(0)}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m${String(Math.floor(s % 60)).padStart(2, '0')}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
    return `${Math.floor(s / 86400)}d${Math.floor((s % 86400) / 3600)}h`;
  }
  function tick() {
    for (const el of $$('time.age')) el.textContent = ago(el.getAttribute('datetime'));
    for (const row of $$('#fleet-rows tr[data-started]')) {
      if (!row.dataset.started) continue;
      const cell = $('.c-duration', row);
      if (cell) cell.textContent = span((Date.now() - Date.parse(row.dataset.started)) / 1000);
    }
    const left = $('#x-left');
    const running = $('#x-state') && $('#x-state').textContent === 'running';
    if (left && left.dataset.deadline && running) {
      left.textContent = span((Date.parse(left.dataset.deadline) - Date.now()) / 1000);
    }
    const elapsed = $('#x-elapsed');
    if (elapsed && elapsed.dataset.started && !elapsed.dataset.ended && running) {
      elapsed.textContent = span((Date.now() - Date.parse(elapsed.dataset.started)) / 1000);
    }
  }
  tick();
  window.setInterval(tick, 1000);

  // --- attention: title badge and notifications ----------------------------------------------------
  const baseTitle = document.title;
  let pending = Number(body.dataset.approvals || 0);
  let alerts = 0;
  function badge() {
    const n = pending + alerts;
    document.title = n ? `(${n}) ${baseTitle}` : baseTitle;
    const nav = $('#nav-approvals');
    if (nav) nav.textContent = pending ? String(pending) : '';
  }
  function notify(title, text, url) {
    if (!('Notification' in window) || Notification.permission !== 'granted') return;
    const note = new Notification(title, { body: text, tag: url });
    note.onclick = () => { window.focus(); window.location.assign(url); };
  }
  const notifyButton = $('#notify');
  if (notifyButton && 'Notification' in window && Notification.permission === 'default') {
    notifyButton.hidden = false;
    notifyButton.addEventListener('click', async () => {
      await Notification.requestPermission();
      notifyButton.hidden = Notification.permission !== 'default';
    });
  }
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden) { alerts = 0; badge(); }
  });
  badge();

  function attention(type, ev) {
    const id = ev.execution_id;
    const d = ev.data || {};
    if (type === 'approval.requested') {
      pending += 1;
      notify('Approval needed', `${id}: ${d.question || d.category || ''}`, '/approvals');
    } else if (['approval.granted', 'approval.denied', 'approval.expired'].includes(type)) {
      pending = Math.max(0, pending - 1);
    } else if (type === 'execution.stalled' || type === 'execution.failed') {
      if (document.hidden) alerts += 1;
      notify(type === 'execution.failed' ? 'Run failed' : 'Run stalled', `${id}: ${d.error || d.reason || ''}`, `/x/${id}`);
    } else {
      return;
    }
    badge();
  }

  // --- the event stream --------------------------------------------------------------------------
  const handlers = [];
  function stream(url, onEvent) {
    const source = new EventSource(url);
    for (const type of TYPES) {
      source.addEventListener(type, (msg) => {
        let ev;
        try { ev = JSON.parse(msg.data); } catch { return; }
        onEvent(type, ev);
      });
    }
    return source;
  }
  if (body.dataset.csrf) {
    const live = stream('/ui/events', (type, ev) => {
      attention(type, ev);
      for (const handle of handlers) handle(type, ev);
    });
    // body[data-live]: 1 while the page's stream is open, 0 while the browser reconnects (it resumes
    // after the last event it saw, Last-Event-ID); the header says so
    live.addEventListener('open', () => { body.dataset.live = '1'; });
    live.addEventListener('error', () => {
      body.dataset.live = '0';
      if (live.readyState === EventSource.CLOSED) { // refused (401: signed out, session or token gone)
        window.location.assign(`/login?next=${encodeURIComponent(window.location.pathname + window.location.search)}`);
      }
    });
  }

  // --- fleet -------------------------------------------------------------------------------------
  if (page === 'fleet') {
    const rows = $('#fleet-rows');
    const filters = JSON.parse($('#filters').textContent || '{}');
    const counters = {};
    for (const el of $$('[data-count]')) counters[el.dataset.count] = el;
    const bump = (key, by) => {
      const el = counters[key];
      if (el) el.textContent = String(Math.max(0, Number(el.textContent) + by));
    };
    // The state of every run not ended yet that the counts cover (the filters but `state`): the
    // server lists them, new requests join; each transition moves one count to another.
    const active = JSON.parse($('#active').textContent || '{}');
    function transition(id, state) {
      const old = active[id];
      if (old === undefined || old === state) return;
      bump(old, -1);
      bump(state, 1);
      if (state === 'exited' || state === 'failed') delete active[id];
      else active[id] = state;
    }
    const signal = (id, type) => document.dispatchEvent(new CustomEvent('corral:fleet', { detail: { id, type } }));
    const matches = (info) => {
      if (filters.state && info.state !== filters.state) return false;
      if (filters.agent && info.agent !== filters.agent) return false;
      if (filters.repo && !(info.repo || '').toLowerCase().includes(filters.repo.toLowerCase())) return false;
      if (filters.label) {
        const [name, value] = filters.label.split('=');
        if ((info.labels || {})[name.trim()] !== (value || '').trim()) return false;
      }
      if (filters.q && !info.text.includes(filters.q.toLowerCase())) return false;
      return true;
    };
    const cell = (label, cls, content) => {
      const td = document.createElement('td');
      td.dataset.label = label;
      if (cls) td.className = cls;
      if (content instanceof Node) td.append(content); else td.textContent = content || '';
      return td;
    };
    const stateBadge = (state) => {
      const s = document.createElement('span');
      s.className = `state s-${state}`;
      s.textContent = state;
      return s;
    };
    const firstPlain = () => $$('tr', rows).find((r) => !r.classList.contains('need')) || null;
    function addRow(ev) {
      const d = ev.data || {};
      const id = ev.execution_id;
      const labels = d.labels || {};
      const text = [id, d.task || '', (d.command || []).join(' '), d.repo || ''].join(' ').toLowerCase();
      const info = { state: filters.state || 'requested', agent: d.agent || 'command', repo: d.repo || '', labels, text };
      if (!matches(info) || id in active || $(`#x-${CSS.escape(id)}`)) return; // (the state is checked below)
      active[id] = 'requested';
      bump('requested', 1);
      bump('all', 1);
      if (filters.state && filters.state !== 'requested') return;
      const tr = document.createElement('tr');
      tr.id = `x-${id}`;
      Object.assign(tr.dataset, {
        id, state: 'requested', agent: info.agent, repo: info.repo, labels: JSON.stringify(labels), text,
        started: '', approvals: '0', cost: '0',
      });
      const link = document.createElement('a');
      link.href = `/x/${id}`;
      link.className = 'xid';
      link.textContent = id;
      const task = document.createElement('div');
      task.className = 'task';
      task.textContent = (d.task || (d.command || []).join(' ')).slice(0, 90);
      const first = document.createElement('td');
      first.dataset.label = 'id';
      first.append(link, task);
      const time = document.createElement('time');
      time.className = 'age';
      time.setAttribute('datetime', ev.ts || new Date().toISOString());
      time.textContent = ago(time.getAttribute('datetime'));
      const code = document.createElement('code');
      tr.append(
        first, cell('state', 'c-state', stateBadge('requested')), cell('needs', 'c-need', ''),
        cell('agent', '', info.agent), cell('repo', '', (info.repo || '').split('/').pop()),
        cell('labels', 'c-labels', Object.entries(labels).map(([k, v]) => `${k}=${v}`).join(' ')),
        cell('age', '', time), cell('duration', 'c-duration', ''), cell('progress', 'c-progress', ''),
        cell('cost', 'c-cost', ''), cell('last output', 'c-last', code),
      );
      rows.insertBefore(tr, firstPlain());
      $('#fleet-empty').hidden = true;
      signal(id, ev.type);
    }
    function setState(row, state, ev) {
      const old = row.dataset.state;
      if (old === state) return;
      row.dataset.state = state;
      $('.c-state', row).replaceChildren(stateBadge(state));
      if (state === 'running' && !row.dataset.started) row.dataset.started = ev.ts || new Date().toISOString();
      if (state === 'exited' || state === 'failed') {
        row.dataset.started = '';
        const d = ev.data || {};
        if (d.duration_s !== undefined && d.duration_s !== null) $('.c-duration', row).textContent = span(d.duration_s);
      }
      if (filters.state && filters.state !== state) row.remove();
    }
    function need(row, delta) {
      const n = Math.max(0, Number(row.dataset.approvals || 0) + delta);
      row.dataset.approvals = String(n);
      const c = $('.c-need', row);
      if (n) {
        c.textContent = `${n} approval${n > 1 ? 's' : ''} pending`;
        row.classList.add('need');
        rows.insertBefore(row, rows.firstChild);
      } else if (c.textContent.includes('approval')) {
        c.textContent = '';
        row.classList.remove('need');
      }
    }
    async function fetchRow(id, type) {
      // a run entering the filtered state (say `running`) that the page did not list: the server renders its row
      const response = await fetch(`/ui/row/${encodeURIComponent(id)}${window.location.search}`, {
        credentials: 'same-origin',
      });
      if (response.status !== 200 || $(`#x-${CSS.escape(id)}`)) return;
      const holder = document.createElement('tbody');
      holder.innerHTML = await response.text(); // server-rendered, every value escaped there
      const tr = holder.firstElementChild;
      if (!tr) return;
      rows.insertBefore(tr, tr.classList.contains('need') ? rows.firstChild : firstPlain());
      $('#fleet-empty').hidden = true;
      tick();
      signal(id, type);
    }
    handlers.push((type, ev) => {
      const id = ev.execution_id;
      if (!id) return;
      if (type === 'execution.requested') { addRow(ev); return; }
      if (STATE_OF[type]) transition(id, STATE_OF[type]);
      const row = $(`#x-${CSS.escape(id)}`);
      if (!row) {
        if (filters.state && STATE_OF[type] === filters.state) fetchRow(id, type);
        return;
      }
      const d = ev.data || {};
      if (STATE_OF[type]) setState(row, STATE_OF[type], ev);
      else if (type === 'output') {
        const lines = String(d.text || '').replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '').split('\n').filter((l) => l.trim());
        if (lines.length) $('.c-last code', row).textContent = lines[lines.length - 1].slice(0, 120);
      } else if (type === 'heartbeat' && d.progress !== undefined && d.progress !== null) {
        $('.c-progress', row).textContent = `${Math.round(Number(d.progress) * 100)}%`;
      } else if (type === 'usage' && d.cost_usd) {
        const cost = Number(row.dataset.cost || 0) + Number(d.cost_usd);
        row.dataset.cost = String(cost);
        $('.c-cost', row).textContent = `$${cost.toFixed(4)}`;
      } else if (type === 'approval.requested') need(row, 1);
      else if (['approval.granted', 'approval.denied', 'approval.expired'].includes(type)) need(row, -1);
      else return;
      signal(id, type);
    });
  }

  // --- one execution: output, timeline, status -------------------------------------------------------
  const FG = { 30: 1, 31: 1, 32: 1, 33: 1, 34: 1, 35: 1, 36: 1, 37: 1, 90: 1, 91: 1, 92: 1, 93: 1, 94: 1, 95: 1, 96: 1, 97: 1 };
  function ansi(text, style, parent) {
    // SGR colours and bold/dim/italic/underline as classes (the CSP allows no inline styles).
    const parts = String(text).split(/(\x1b\[[0-9;]*m)/);
    for (const part of parts) {
      const sgr = /^\x1b\[([0-9;]*)m$/.exec(part);
      if (sgr) {
        const codes = sgr[1] === '' ? [0] : sgr[1].split(';').map(Number);
        for (let i = 0; i < codes.length; i += 1) {
          const c = codes[i];
          if (c === 0) { style.fg = null; style.bg = null; style.bold = false; style.dim = false; style.it = false; style.ul = false; }
          else if (c === 1) style.bold = true;
          else if (c === 2) style.dim = true;
          else if (c === 3) style.it = true;
          else if (c === 4) style.ul = true;
          else if (c === 22) { style.bold = false; style.dim = false; }
          else if (c === 23) style.it = false;
          else if (c === 24) style.ul = false;
          else if (FG[c]) style.fg = c;
          else if (c === 39) style.fg = null;
          else if ((c >= 40 && c <= 47) || (c >= 100 && c <= 107)) style.bg = c;
          else if (c === 49) style.bg = null;
          else if (c === 38 || c === 48) i += codes[i + 1] === 5 ? 2 : 4; // 256 / true colour: skipped
        }
        continue;
      }
      const clean = part.replace(/\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r(?!\n)/g, '');
      if (!clean) continue;
      const classes = [];
      if (style.fg) classes.push(`fg${style.fg}`);
      if (style.bg) classes.push(`bg${style.bg}`);
      if (style.bold) classes.push('b');
      if (style.dim) classes.push('dim');
      if (style.it) classes.push('it');
      if (style.ul) classes.push('ul');
      if (classes.length) {
        const s = document.createElement('span');
        s.className = classes.join(' ');
        s.textContent = clean;
        parent.append(s);
      } else {
        parent.append(document.createTextNode(clean));
      }
    }
  }

  function summary(ev) {
    const d = ev.data || {};
    const pick = ['question', 'category', 'approval_id', 'choice', 'decided_by', 'name', 'tool', 'input_summary',
      'n', 'files', 'trigger', 'reason', 'limit', 'value', 'exit_code', 'error', 'text', 'cost_usd', 'message',
      'requested_by', 'seconds', 'pid', 'path', 'violations'];
    const parts = [];
    for (const key of pick) {
      if (d[key] !== undefined && d[key] !== null && d[key] !== '') {
        const v = typeof d[key] === 'object' ? JSON.stringify(d[key]) : String(d[key]);
        parts.push(`${key}=${v.length > 120 ? `${v.slice(0, 119)}…` : v}`);
      }
    }
    return parts.join(' ');
  }

  if (page === 'execution') {
    const xid = $('#execution').dataset.id;
    const out = $('#output');
    const follow = $('#follow');
    const toEnd = $('#to-end');
    const timeline = $('#timeline');
    const filterBox = $('#timeline-filter');
    const styles = { stdout: {}, stderr: {} };
    const atBottom = () => out.scrollHeight - out.scrollTop - out.clientHeight < 40;
    toEnd.addEventListener('click', () => { out.scrollTop = out.scrollHeight; toEnd.hidden = true; });
    out.addEventListener('scroll', () => { if (atBottom()) toEnd.hidden = true; });
    const applyFilter = () => {
      const f = filterBox.value.trim().toLowerCase();
      for (const li of timeline.children) li.hidden = Boolean(f) && !li.textContent.toLowerCase().includes(f);
    };
    filterBox.addEventListener('input', applyFilter);
    const stateEl = $('#x-state');
    stream(`/ui/x/${encodeURIComponent(xid)}/events`, (type, ev) => {
      const d = ev.data || {};
      if (type === 'output') {
        const bottom = atBottom();
        const target = d.stream === 'stderr' ? document.createElement('span') : out;
        if (target !== out) { target.className = 'stderr'; out.append(target); }
        ansi(d.text || '', styles[d.stream] || styles.stdout, target);
        if (follow.checked && bottom) out.scrollTop = out.scrollHeight;
        else if (!bottom) toEnd.hidden = false;
        out.dispatchEvent(new CustomEvent('corral:output'));
        return;
      }
      const li = document.createElement('li');
      li.dataset.type = type;
      const time = document.createElement('time');
      time.textContent = String(ev.ts || '').slice(11, 19);
      time.title = ev.ts || '';
      const kind = document.createElement('b');
      kind.textContent = type;
      const rest = document.createElement('span');
      rest.textContent = ` ${summary(ev)}`;
      li.append(time, ' ', kind, rest);
      timeline.append(li);
      applyFilter();
      if (STATE_OF[type] && stateEl) {
        stateEl.textContent = STATE_OF[type];
        stateEl.className = `state s-${STATE_OF[type]}`;
        const elapsed = $('#x-elapsed');
        if (elapsed && type === 'execution.started') elapsed.dataset.started = ev.ts;
        if (elapsed && (type === 'execution.exited' || type === 'execution.failed')) {
          elapsed.dataset.ended = ev.ts || 'yes';
          if (d.duration_s !== undefined && d.duration_s !== null) elapsed.textContent = span(d.duration_s);
        }
      }
      if (type === 'timeout.extended' && d.hard_deadline && $('#x-left')) $('#x-left').dataset.deadline = d.hard_deadline;
      if (type === 'approval.requested') $('#x-need').textContent = 'approval pending';
      if (['approval.granted', 'approval.denied', 'approval.expired'].includes(type)) $('#x-need').textContent = '';
    });
  }

  // --- approvals inbox: re-rendered by the server when a decision or a request arrives -------------
  if (page === 'approvals') {
    let timer = null;
    handlers.push((type) => {
      if (!type.startsWith('approval.')) return;
      window.clearTimeout(timer);
      timer = window.setTimeout(async () => {
        const response = await fetch('/ui/approvals', { credentials: 'same-origin' });
        if (response.ok) {
          $('#inbox').innerHTML = await response.text(); // server-rendered, every value escaped there
          tick();
        }
      }, 150);
    });
  }

  // --- changes: line comments ----------------------------------------------------------------------
  if (page === 'changes') {
    const comments = [];
    const list = $('#comments');
    const hidden = $('#comments-json');
    const render = () => {
      list.replaceChildren();
      comments.forEach((c, i) => {
        const li = document.createElement('li');
        li.textContent = `${c.path}:${c.line}: ${c.text} `;
        const remove = document.createElement('button');
        remove.type = 'button';
        remove.textContent = 'remove';
        remove.addEventListener('click', () => { comments.splice(i, 1); render(); });
        li.append(remove);
        list.append(li);
      });
      hidden.value = JSON.stringify(comments);
      $('#send-comments').textContent = comments.length
        ? `Send ${comments.length} comment${comments.length > 1 ? 's' : ''} to the agent` : 'Send comments to the agent';
    };
    $('#review').addEventListener('corral:done', () => { comments.length = 0; render(); });
    $('#diffs').addEventListener('click', (ev) => {
      const row = ev.target.closest('tr[data-path]');
      if (!row || ev.target.closest('form')) return;
      if (row.nextElementSibling && row.nextElementSibling.classList.contains('comment-box')) return;
      const box = document.createElement('tr');
      box.className = 'comment-box';
      const td = document.createElement('td');
      td.colSpan = 4;
      const area = document.createElement('textarea');
      area.rows = 2;
      area.placeholder = `comment on ${row.dataset.path}:${row.dataset.line}`;
      area.setAttribute('aria-label', 'comment');
      const addButton = document.createElement('button');
      addButton.type = 'button';
      addButton.textContent = 'Add comment';
      addButton.className = 'add-comment';
      const cancel = document.createElement('button');
      cancel.type = 'button';
      cancel.textContent = 'Cancel';
      addButton.addEventListener('click', () => {
        if (!area.value.trim()) return;
        comments.push({ path: row.dataset.path, line: Number(row.dataset.line), text: area.value.trim() });
        row.classList.add('commented');
        box.remove();
        render();
      });
      cancel.addEventListener('click', () => box.remove());
      td.append(area, addButton, cancel);
      box.append(td);
      row.after(box);
      area.focus();
    });
    render();
  }
})();
