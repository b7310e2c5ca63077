// The diffusiond page: a prompt form, the queue with live progress and previews, recent images.
// Plain JS on the server's own endpoints: /api/jobs, /api/events (Server-Sent Events), /sdapi/v1.
"use strict";

const jobs = new Map();  // id -> job (as /api/jobs gives it), plus step/total/preview from events
const RECENT = 24;
const $ = (selector) => document.querySelector(selector);
// Our scheduler names -> the sampler names the form offers (the daemon takes either).
const SAMPLER_OF = { dpmpp_2m: "DPM++ 2M", dpmpp_2m_karras: "DPM++ 2M Karras", euler: "Euler", euler_a: "Euler a",
                     ddim: "DDIM", pndm: "PNDM", lcm: "LCM" };

async function api(path, options = {}) {
  const response = await fetch(path, { headers: { "Content-Type": "application/json" }, ...options });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error((body && body.detail) || `${response.status} ${response.statusText}`);
  return body;
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value; else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function render() {
  const queue = $("#queue");
  const active = [...jobs.values()].filter((j) => j.state === "queued" || j.state === "running")
    .sort((a, b) => (a.state === "running" ? -1 : 0) - (b.state === "running" ? -1 : 0) || a.created - b.created);
  queue.replaceChildren(...active.map(queueItem));
  if (!active.length) queue.append(element("li", { class: "empty", text: "Nothing queued." }));
  const done = [...jobs.values()].filter((j) => j.state === "done" || j.state === "failed" || j.state === "cancelled")
    .sort((a, b) => (b.finished || 0) - (a.finished || 0)).slice(0, RECENT);
  $("#recent").replaceChildren(...done.map(recentItem));
}

function queueItem(job) {
  const thumb = job.preview ? element("img", { class: "preview", alt: "step preview", src: `data:image/jpeg;base64,${job.preview}` })
                            : element("div", { class: "thumb" });
  const bar = element("progress", { max: job.total || 1, value: job.step || 0 });
  const label = job.state === "running" ? `running, step ${job.step || 0} of ${job.total || "?"}` : "queued";
  const cancel = element("button", { class: "cancel", type: "button", text: "Cancel" });
  cancel.addEventListener("click", () => api(`/api/jobs/${job.id}/cancel`, { method: "POST" }).catch(showError));
  const text = element("div", {}, element("div", { class: "prompt", text: job.params.prompt }),
                       element("div", { class: "state", text: label }), bar);
  return element("li", { "data-job": job.id, "data-state": job.state }, thumb, text, cancel);
}

function recentItem(job) {
  const figure = element("figure", { "data-job": job.id, "data-state": job.state, title: "reuse these settings" });
  if (job.state === "done" && job.outputs && job.outputs.length) {
    figure.append(element("img", { alt: job.params.prompt, src: `/api/jobs/${job.id}/images/0` }));
  } else {
    figure.append(element("div", { class: "thumb", text: job.state }));
  }
  const p = job.params;
  figure.append(element("figcaption", { text: `${p.prompt} · ${p.steps} steps · seed ${(job.result || {}).seed ?? p.seed}` }));
  figure.addEventListener("click", () => reuse(job));
  return figure;
}

function reuse(job) {
  const form = $("#prompt-form");
  const p = job.params;
  form.prompt.value = p.prompt || "";
  form.negative_prompt.value = p.negative_prompt || "";
  for (const name of ["steps", "guidance_scale", "width", "height", "count"]) form[name].value = p[name] ?? "";
  form.seed.value = (job.result || {}).seed ?? p.seed ?? "";
  if (SAMPLER_OF[p.scheduler]) form.scheduler.value = SAMPLER_OF[p.scheduler];
  if ([...form.model.options].some((o) => o.value === job.model)) form.model.value = job.model;
  form.prompt.focus();
}

function showError(error) { $("#form-error").textContent = error.message; }

async function refresh(id) {
  try {
    const job = await api(`/api/jobs/${id}`);
    jobs.set(id, { ...jobs.get(id), ...job });
    render();
  } catch (error) { /* pruned meanwhile */ }
}

async function loadAll() {
  const listing = await api("/api/jobs?limit=50");
  for (const job of listing.jobs) jobs.set(job.id, { ...jobs.get(job.id), ...job });
  render();
}

function follow() {
  const events = new EventSource("/api/events");
  events.onopen = () => { $("#status").textContent = "live"; loadAll().catch(showError); };
  events.onerror = () => { $("#status").textContent = "reconnecting…"; };
  events.onmessage = (message) => {
    const event = JSON.parse(message.data);
    const job = event.job && jobs.get(event.job);
    switch (event.type) {
      case "job.progress":
        if (job) { Object.assign(job, { state: "running", step: event.step, total: event.total }); render(); }
        break;
      case "job.preview":
        if (job) { Object.assign(job, { preview: event.jpeg, step: event.step, total: event.total }); render(); }
        break;
      case "job.resync":
        jobs.set(event.job, { ...job, ...event.state }); render();
        break;
      default:
        if (event.job) refresh(event.job);
    }
  };
}

async function submit(event) {
  event.preventDefault();
  const form = event.target;
  const fields = { prompt: form.prompt.value };
  if (form.negative_prompt.value) fields.negative_prompt = form.negative_prompt.value;
  for (const name of ["steps", "width", "height", "seed", "count"]) {
    if (form[name].value !== "") fields[name] = parseInt(form[name].value, 10);
  }
  if (form.guidance_scale.value !== "") fields.guidance_scale = parseFloat(form.guidance_scale.value);
  if (form.scheduler.value) fields.scheduler = form.scheduler.value;
  if (form.model.value) fields.model = form.model.value;
  $("#form-error").textContent = "";
  try {
    const reply = await api("/api/jobs", { method: "POST", body: JSON.stringify(fields) });
    jobs.set(reply.job.id, { ...jobs.get(reply.job.id), ...reply.job });
    render();
  } catch (error) { showError(error); }
}

async function loadChoices() {
  const [samplers, models] = await Promise.all([api("/sdapi/v1/samplers"), api("/sdapi/v1/sd-models")]);
  const names = samplers.map((s) => s.name);
  if (names.includes("DPM++ 2M")) names.splice(names.indexOf("DPM++ 2M") + 1, 0, "DPM++ 2M Karras");
  $("#scheduler").replaceChildren(...names.map((n) => element("option", { value: n, text: n })));
  $("#scheduler").value = "DPM++ 2M";
  for (const model of models) $("#model").append(element("option", { value: model.model_name, text: model.title }));
}

document.addEventListener("DOMContentLoaded", () => {
  $("#prompt-form").addEventListener("submit", submit);
  loadChoices().catch(showError);
  follow();
});
