// The shape ServiceProcessing already calls: one method, a worker type, a
// command and a request. Registering EmbeddedProcessingWorker for this
// interface instead of the out-of-process client is the one-line switch.
// A token already cancelled gives a cancelled task; a call under way runs to
// its end (it is microseconds, or it is `background: false` and the work is
// cancelled with control_session).
using System.Threading;
using System.Threading.Tasks;

namespace EmbeddedWorker
{
    public enum PythonWorkerType
    {
        Processing,
        Device,
        Model,
        Inference,
        Postprocessing,
    }

    public interface IPythonWorkerService
    {
        /// <summary>Run `command` (optionally domain-prefixed) with `request`; the reply envelope.</summary>
        Task<Reply> ExecuteAsync(PythonWorkerType workerType, string command, object request,
                                 CancellationToken cancellationToken = default(CancellationToken));

        /// <summary>The same with a JSON request and a JSON reply, for hosts that already hold JSON.</summary>
        Task<string> ExecuteJsonAsync(PythonWorkerType workerType, string command, string requestJson,
                                      CancellationToken cancellationToken = default(CancellationToken));
    }
}
