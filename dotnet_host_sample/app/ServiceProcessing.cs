// A sample of what the real ServiceProcessing does with the worker: a
// workflow cache, sessions (execute, poll, pause/resume/cancel/restart,
// delete) and batches (execute, status, delete). It talks only through
// IPythonWorkerService, exactly as the real service talks to its worker.
// Every *Async method takes a CancellationToken and passes it on; a wait
// stops when it fires. Failures stay envelopes (reply.success, reply.Code).
using System;
using System.Collections.Generic;
using System.Threading;
using System.Threading.Tasks;
using EmbeddedWorker;

namespace EmbeddedWorkerHost
{
    public sealed class ServiceProcessing
    {
        static readonly TimeSpan CacheLifetime = TimeSpan.FromMinutes(5);

        readonly IPythonWorkerService worker;
        readonly object cacheLock = new object();
        Dictionary<string, Reply> workflowCache;
        DateTime cachedAt;

        public ServiceProcessing(IPythonWorkerService worker)
        {
            this.worker = worker;
        }

        Task<Reply> Processing(string command, object request, CancellationToken cancellationToken = default(CancellationToken))
        {
            return worker.ExecuteAsync(PythonWorkerType.Processing, command, request, cancellationToken);
        }

        public async Task<IList<Reply>> GetWorkflowsAsync(bool refresh = false, CancellationToken cancellationToken = default(CancellationToken))
        {
            lock (cacheLock)
                if (!refresh && workflowCache != null && DateTime.UtcNow - cachedAt < CacheLifetime)
                    return new List<Reply>(workflowCache.Values);
            var reply = await Processing("get_workflows", new { action = "get_workflows" }, cancellationToken).ConfigureAwait(false);
            if (!reply.Success) throw new InvalidOperationException("get_workflows failed: " + reply.Error);
            var fresh = new Dictionary<string, Reply>();
            foreach (Reply workflow in reply.List("workflows")) fresh[workflow.Text("id")] = workflow;
            lock (cacheLock)
            {
                workflowCache = fresh;
                cachedAt = DateTime.UtcNow;
            }
            return new List<Reply>(fresh.Values);
        }

        public Task<Reply> StartSessionAsync(string workflowId, object parameters, int priority = 5, CancellationToken cancellationToken = default(CancellationToken))
        {
            return Processing("execute_workflow", new
            {
                session_id = Guid.NewGuid(),
                workflow_id = workflowId,
                parameters = parameters,
                priority = priority,
                background = true,
                action = "execute_workflow",
            }, cancellationToken);
        }

        public Task<Reply> GetSessionStatusAsync(string sessionId, CancellationToken cancellationToken = default(CancellationToken))
        {
            return Processing("get_session_status", new { session_id = sessionId, action = "get_status" }, cancellationToken);
        }

        public Task<Reply> ControlSessionAsync(string sessionId, string action, CancellationToken cancellationToken = default(CancellationToken))
        {
            return Processing("control_session", new { session_id = sessionId, action = action, parameters = (object)null }, cancellationToken);
        }

        public Task<Reply> PauseAsync(string sessionId, CancellationToken cancellationToken = default(CancellationToken)) { return ControlSessionAsync(sessionId, "pause", cancellationToken); }
        public Task<Reply> ResumeAsync(string sessionId, CancellationToken cancellationToken = default(CancellationToken)) { return ControlSessionAsync(sessionId, "resume", cancellationToken); }
        public Task<Reply> CancelAsync(string sessionId, CancellationToken cancellationToken = default(CancellationToken)) { return ControlSessionAsync(sessionId, "cancel", cancellationToken); }
        public Task<Reply> RestartAsync(string sessionId, CancellationToken cancellationToken = default(CancellationToken)) { return ControlSessionAsync(sessionId, "restart", cancellationToken); }

        public Task<Reply> DeleteSessionAsync(string sessionId, CancellationToken cancellationToken = default(CancellationToken))
        {
            return Processing("delete_session", new { session_id = sessionId, force_cleanup = true, action = "delete_session" }, cancellationToken);
        }

        /// <summary>The request the existing client sends: no items, the count in parameters.total_images.</summary>
        public Task<Reply> StartBatchAsync(string workflowId, object parameters, CancellationToken cancellationToken = default(CancellationToken))
        {
            return Processing("execute_batch", new
            {
                batch_id = Guid.NewGuid(),
                workflow_id = workflowId,
                parameters = parameters,
                background = true,
                action = "execute_batch",
            }, cancellationToken);
        }

        public Task<Reply> GetBatchStatusAsync(string batchId, CancellationToken cancellationToken = default(CancellationToken))
        {
            return Processing("get_batch_status", new { batch_id = batchId, action = "get_status" }, cancellationToken);
        }

        public Task<Reply> DeleteBatchAsync(string batchId, CancellationToken cancellationToken = default(CancellationToken))
        {
            return Processing("delete_batch", new { batch_id = batchId, force_cleanup = true, action = "delete_batch" }, cancellationToken);
        }

        /// <summary>The design document's cross-domain request: load a model, batch on it, enhance the batch.</summary>
        public Task<Reply> CoordinateAsync(string coordinationId, string modelId, object generationParams, int totalImages, CancellationToken cancellationToken = default(CancellationToken))
        {
            return Processing("execute_workflow", new
            {
                coordination_id = coordinationId,
                workflow_id = "sd-generate-enhance",
                domains = new object[]
                {
                    new { domain = "model", operation = "load_model", parameters = new { model_id = modelId } },
                    new { domain = "inference", operation = "batch_process", parameters = new
                    {
                        batch_id = Guid.NewGuid(),
                        batch_config = new { total_images = totalImages, preferred_batch_size = 2, max_batch_size = 4,
                                             enable_dynamic_sizing = true, memory_threshold = 0.8,
                                             parallel_processing = false },
                        generation_params = generationParams,
                    } },
                    new { domain = "postprocessing", operation = "enhance", parameters = new { sharpness = 1.5 } },
                },
                coordination_mode = "sequential",
            }, cancellationToken);
        }

        static readonly PythonWorkerType[] StatusDomains =
            { PythonWorkerType.Model, PythonWorkerType.Inference, PythonWorkerType.Postprocessing, PythonWorkerType.Device };

        /// <summary>Status aggregation as the document does it: every domain's get_status for the session, by domain.</summary>
        public async Task<IDictionary<string, Reply>> GetAggregatedStatusAsync(string sessionId, CancellationToken cancellationToken = default(CancellationToken))
        {
            var names = new[] { "model", "inference", "postprocessing", "device" };
            var asked = new List<Task<Reply>>();
            foreach (var domain in StatusDomains)
                asked.Add(worker.ExecuteAsync(domain, "get_status", new { session_id = sessionId, domains = names }));
            var replies = await Task.WhenAll(asked).ConfigureAwait(false);
            var parts = new Dictionary<string, Reply>();
            for (int i = 0; i < names.Length; i++) parts[names[i]] = replies[i];
            return parts;
        }

        /// <summary>Poll the session until it is final (or `timeout`), as the real service's status loop does.</summary>
        public async Task<Reply> WaitForSessionAsync(string sessionId, TimeSpan poll, TimeSpan timeout, CancellationToken cancellationToken = default(CancellationToken))
        {
            var deadline = DateTime.UtcNow + timeout;
            while (true)
            {
                var status = await GetSessionStatusAsync(sessionId, cancellationToken).ConfigureAwait(false);
                var state = status.Text("status");
                if (!status.Success || WorkStatus.IsFinal(state)
                    || DateTime.UtcNow > deadline)
                    return status;
                await Task.Delay(poll, cancellationToken).ConfigureAwait(false);
            }
        }
    }
}
