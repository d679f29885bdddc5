// A headless Chromium that a Python test drives, one JSON command a line.
//
//   node tests/browser/driver.mjs            (CHROMIUM=/path overrides /usr/bin/chromium)
//
// Debian's Chromium, driven by playwright-core (no browser is downloaded,
// ever: `npx playwright install` is not used). Each command on stdin is
// {"id": n, "op": ..., ...}; each answer on stdout is {"id": n, "ok": true,
// "result": ...} or {"id": n, "ok": false, "error": "..."}. The first line
// out is {"ready": true, "version": "<browser version>"}.
//
// ops:
//   goto        {url}                       load a page, wait for its DOM
//   eval        {expression}                the value of a JS expression in the page
//   wait        {expression, timeout_ms}    until the expression is truthy (polled); its value
//   screenshot  {path}                      a full-page PNG
//   log         {}                          console messages and page errors so far
//   close       {}                          close the browser and exit
//
// The browser runs with a fresh profile in a temporary directory, removed at exit.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

import { chromium } from 'playwright-core';

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const args = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'keepcount-chromium-'));
let context = null;

function send(message) {
  process.stdout.write(JSON.stringify(message) + '\n');
}

async function shutdown(code) {
  try {
    if (context) await context.close();
  } catch (err) {
    process.stderr.write(`closing the browser: ${err}\n`);
  }
  fs.rmSync(profile, { recursive: true, force: true });
  process.exit(code);
}

process.on('SIGTERM', () => { shutdown(143); });
process.on('SIGINT', () => { shutdown(130); });

try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args,
    viewport: { width: 1400, height: 1000 },
  });
} catch (err) {
  process.stderr.write(`cannot start ${executablePath}: ${err}\n`);
  await shutdown(2);
}

const page = context.pages()[0] || await context.newPage();
const log = [];
page.on('console', (msg) => log.push({ kind: 'console', type: msg.type(), text: msg.text() }));
page.on('pageerror', (err) => log.push({ kind: 'pageerror', text: String(err) }));

async function run(cmd) {
  switch (cmd.op) {
    case 'goto':
      await page.goto(cmd.url, { waitUntil: 'domcontentloaded', timeout: cmd.timeout_ms || 30000 });
      return page.url();
    case 'eval':
      return await page.evaluate(cmd.expression);
    case 'wait': {
      // Not page.waitForFunction: it evaluates its predicate with eval() inside
      // the page, which the page's Content-Security-Policy forbids (rightly).
      // page.evaluate goes through the DevTools protocol, outside the CSP.
      const deadline = Date.now() + (cmd.timeout_ms || 30000);
      for (;;) {
        const value = await page.evaluate(cmd.expression);
        if (value) return value;
        if (Date.now() > deadline) {
          throw new Error(`timed out after ${cmd.timeout_ms || 30000} ms waiting for ${cmd.expression}`);
        }
        await new Promise((resolve) => { setTimeout(resolve, cmd.polling_ms || 50); });
      }
    }
    case 'screenshot':
      await page.screenshot({ path: cmd.path, fullPage: true });
      return cmd.path;
    case 'log':
      return log;
    case 'close':
      send({ id: cmd.id, ok: true, result: null });
      await shutdown(0);
      return null;
    default:
      throw new Error(`unknown op ${JSON.stringify(cmd.op)}`);
  }
}

send({ ready: true, version: context.browser() ? context.browser().version() : null });

const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let cmd;
  try {
    cmd = JSON.parse(line);
    send({ id: cmd.id, ok: true, result: await run(cmd) });
  } catch (err) {
    send({ id: cmd ? cmd.id : null, ok: false, error: String(err && err.stack ? err.stack : err) });
  }
}
await shutdown(0);
