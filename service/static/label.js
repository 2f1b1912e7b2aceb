// The labelling page: claim the most uncertain task, show it, label it with one click or key.
// Skipped tasks stay claimed (so they are not shown again at once) and are given back when the
// queue runs dry or the page is closed; otherwise their lease simply runs out.
"use strict";

const API = "/v1/labelling";
const EMPTY_RETRY_MS = 3000;
const $ = (id) => document.getElementById(id);

const page = {
  task: null,
  skipped: [],
  labelled: 0,
  keys: new Map(), // key → class name
  imageUrl: null,
};

function labeller() {
  return $("labeller").value.trim() || "anonymous";
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = sessionStorage.getItem("halflabel.key");
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(API + path, { ...options, headers });
  if (response.status === 401 || response.status === 403) {
    $("key-form").hidden = false;
    $("task").hidden = true;
    throw new Error("an API key with the 'label' scope is needed");
  }
  return response;
}

async function detail(response) {
  try {
    return (await response.json()).detail || response.statusText;
  } catch {
    return response.statusText;
  }
}

function say(message, isError = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", isError);
}

async function claim() {
  const query = new URLSearchParams({ limit: "1", labeller: labeller() });
  const response = await api(`/tasks?${query}`);
  if (!response.ok) throw new Error(await detail(response));
  return (await response.json()).tasks[0] || null;
}

async function release(ids) {
  const body = JSON.stringify({ labeller: labeller() });
  const headers = { "Content-Type": "application/json" };
  await Promise.all(ids.map((id) =>
    api(`/tasks/${id}/release`, { method: "POST", body, headers, keepalive: true }).catch(() => {})));
}

async function next() {
  let task = await claim();
  if (!task && page.skipped.length) {
    await release(page.skipped.splice(0));
    task = await claim();
  }
  page.task = task;
  if (!task) {
    $("task").hidden = true;
    $("empty").hidden = false;
    setTimeout(() => next().catch(fail), EMPTY_RETRY_MS);
  } else {
    await show(task);
  }
  await progress();
}

async function show(task) {
  const response = await api(`/tasks/${task.id}/image`);
  if (!response.ok) throw new Error(await detail(response));
  if (page.imageUrl) URL.revokeObjectURL(page.imageUrl);
  page.imageUrl = URL.createObjectURL(await response.blob());
  $("image").src = page.imageUrl;
  const best = task.guesses[0];
  $("image").alt = `Image to label; the model's best guess is ${best ? best.label : "unknown"}`;
  $("uncertainty").textContent =
    `Uncertainty ${(task.normalized_entropy * 100).toFixed(0)}% · seen ${task.hits}× · ` +
    `${task.model_name} v${task.model_version}`;
  showGuesses(task.guesses);
  showClasses(task.classes, best && best.label);
  $("empty").hidden = true;
  $("key-form").hidden = true;
  $("task").hidden = false;
}

function showGuesses(guesses) {
  $("guesses").replaceChildren(...guesses.map((guess) => {
    const item = document.createElement("li");
    const percent = (guess.probability * 100).toFixed(1);
    item.innerHTML = '<span class="name"></span><span class="bar"><span></span></span><span class="pct"></span>';
    item.querySelector(".name").textContent = guess.label;
    item.querySelector(".bar span").style.width = `${percent}%`;
    item.querySelector(".pct").textContent = `${percent}%`;
    return item;
  }));
}

// Single-character class names (digits, letters) are their own keys; otherwise 1..9, 0.
function keysFor(classes) {
  const own = classes.every((name) => name.length === 1 && name !== "s");
  return classes.map((name, i) => (own ? name : i < 10 ? String((i + 1) % 10) : null));
}

function showClasses(classes, topGuess) {
  const keys = keysFor(classes);
  page.keys = new Map(keys.map((key, i) => [key, classes[i]]).filter(([key]) => key !== null));
  $("classes").replaceChildren(...classes.map((name, i) => {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.label = name;
    button.className = name === topGuess ? "top" : "";
    if (keys[i] !== null) {
      const kbd = document.createElement("kbd");
      kbd.textContent = keys[i];
      button.append(kbd);
      button.setAttribute("aria-keyshortcuts", keys[i]);
    }
    button.append(name);
    button.addEventListener("click", () => label(name).catch(fail));
    return button;
  }));
}

async function label(name) {
  const task = page.task;
  if (!task) return;
  page.task = null; // one label per task, however fast the keys are pressed
  const response = await api(`/tasks/${task.id}/label`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ label: name, labeller: labeller() }),
  });
  if (response.ok) {
    page.labelled += 1;
    say(`Labelled ${name}.`);
  } else {
    say(await detail(response), true);
  }
  await next();
}

async function skip() {
  if (!page.task) return;
  page.skipped.push(page.task.id);
  page.task = null;
  say("Skipped.");
  await next();
}

async function progress() {
  const response = await api("/stats");
  if (!response.ok) return;
  const stats = await response.json();
  $("progress").textContent =
    `You labelled ${page.labelled} this session · ${stats.pending} waiting · ` +
    `${stats.claimed} being labelled · ${stats.labelled} labelled in all`;
}

function fail(error) {
  say(`Problem: ${error.message}`, true);
}

function onKey(event) {
  if (event.target.tagName === "INPUT" || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "s" || event.key === "S") {
    event.preventDefault();
    skip().catch(fail);
  } else if (page.keys.has(event.key)) {
    event.preventDefault();
    label(page.keys.get(event.key)).catch(fail);
  }
}

function start() {
  const saved = localStorage.getItem("halflabel.labeller");
  $("labeller").value = saved || `labeller-${Math.random().toString(36).slice(2, 7)}`;
  $("labeller").addEventListener("change", () => localStorage.setItem("halflabel.labeller", labeller()));
  $("skip").addEventListener("click", () => skip().catch(fail));
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("halflabel.key", $("api-key").value.trim());
    say("");
    next().catch(fail);
  });
  document.addEventListener("keydown", onKey);
  window.addEventListener("pagehide", () => {
    release([...page.skipped, ...(page.task ? [page.task.id] : [])]);
  });
  next().catch(fail);
}

start();
